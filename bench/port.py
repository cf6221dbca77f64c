"""The most used PyTorch port's decoder (sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning,
``DecoderWithAttention``), reduced to its training step, as the side-by-side baseline of the
training benchmark. Its cost is in the attention: ``encoder_att(encoder_out)``, the projection of
all L annotation vectors, is recomputed at every time step, and each step runs the LSTM cell on
a batch that shrinks as captions end (captions sorted by length, padded)."""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class PortDecoder(nn.Module):
    """The decoder of the most used PyTorch port (sgrvinod's tutorial), its training step's work
    as that code does it, for the side-by-side rate of bench.training."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 512,
        decoder_dim: int = 512,
        attention_dim: int = 512,
        encoder_dim: int = 512,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h, self.init_c = nn.Linear(encoder_dim, decoder_dim), nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.fc = nn.Linear(decoder_dim, vocab_size)

    def attention(self, encoder_out, h):
        """The port's attention: encoder_out (B, L, D), h (B, hidden) -> context (B, D), alpha (B, L)."""
        att = self.full_att(torch.relu(self.encoder_att(encoder_out) + self.decoder_att(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(att, dim=1)
        return (encoder_out * alpha.unsqueeze(2)).sum(dim=1), alpha

    def forward(self, encoder_out, captions, lengths):
        """encoder_out: (B, L, D); captions: (B, T) padded, sorted by decreasing ``lengths``."""
        B, L, _ = encoder_out.shape
        embeddings = self.embedding(captions)
        mean = encoder_out.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        decode_lengths = [n - 1 for n in lengths]
        T = max(decode_lengths)
        predictions = torch.zeros(B, T, self.fc.out_features, device=encoder_out.device)
        alphas = torch.zeros(B, T, L, device=encoder_out.device)
        for t in range(T):
            b = sum(n > t for n in decode_lengths)
            context, alpha = self.attention(encoder_out[:b], h[:b])
            context = torch.sigmoid(self.f_beta(h[:b])) * context
            h, c = self.decode_step(torch.cat([embeddings[:b, t], context], dim=1), (h[:b], c[:b]))
            predictions[:b, t] = self.fc(self.dropout(h))
            alphas[:b, t] = alpha
        return predictions, alphas, decode_lengths


def port_step(decoder: PortDecoder, optimizer, encoder_out, captions, lengths, alpha_c: float = 1.0) -> float:
    """One training step as the port's train.py does it (fp32, cross-entropy on the packed
    predictions, its doubly stochastic term, gradient clipping at 5)."""
    predictions, alphas, decode_lengths = decoder(encoder_out, captions, lengths)
    scores = pack_padded_sequence(predictions, decode_lengths, batch_first=True).data
    targets = pack_padded_sequence(captions[:, 1:], decode_lengths, batch_first=True).data
    loss = nn.functional.cross_entropy(scores, targets) + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_value_(decoder.parameters(), 5.0)
    optimizer.step()
    return loss.item()
