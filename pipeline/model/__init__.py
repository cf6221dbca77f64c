"""The paper: the attention decoder (decoder: f_att, the gating scalar, the LSTM and the deep
output, the objectives), its batched greedy and beam-search decoding (decode), and the decoder
step under torch.compile (compiled). Never imports stage one."""
