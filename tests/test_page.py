"""The web page in a real browser: `cli.py serve` on a free loopback port, driven through Debian's
headless Chromium by Selenium (browser downloads are not reachable here)."""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, png_header, run_cli

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page(trained_run):
    """The URL of a page serving the trained run's best.pt; the server is stopped afterwards."""
    out, root = trained_run
    port = _free_port()
    server = run_cli(
        "serve", "--checkpoint", str(out / "run" / "best.pt"), "--port", str(port), "--examples", str(root / "images")
    )
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
    while True:
        assert server.poll() is None, server.communicate()
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the page never answered"
            time.sleep(0.5)
    yield url, server
    server.terminate()
    server.communicate(timeout=60)


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run "
            "installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _upload(driver, url, path, until):
    """Open the page, upload ``path`` and wait until ``until(driver)`` is truthy; returns that."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 180)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))[0].send_keys(str(path))
    return wait.until(until)


def _caption(driver):
    from selenium.webdriver.common.by import By

    boxes = driver.find_elements(By.CSS_SELECTOR, "#caption textarea")
    return boxes and boxes[0].get_attribute("value")


def _status(driver):
    from selenium.webdriver.common.by import By

    text = " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "#status"))
    return "could not be captioned" in text and text


def test_the_page_captions_an_upload_as_the_command_does(page, browser, trained_run, tmp_path):
    url, server = page
    out, root = trained_run
    image = sorted((root / "images").glob("*.jpg"))[0]
    command = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "caption", str(image), "--checkpoint", str(out / "run" / "best.pt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert command.returncode == 0, command.stderr
    assert _upload(browser, url, image, _caption) == command.stdout.split(": ", 1)[1].strip()
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000

    bad = tmp_path / "notes.jpg"
    bad.write_text("a caption, not a picture\n")
    message = _upload(browser, url, bad, _status)
    assert "notes.jpg could not be captioned: this is not an image file" in message
    assert server.poll() is None  # the server goes on
    assert _upload(browser, url, image, _caption) == command.stdout.split(": ", 1)[1].strip()


def test_an_upload_too_large_or_not_an_image_is_refused_before_decoding(tmp_path):
    from PIL import Image

    from pipeline.serve.web import MAX_BYTES, upload_problem

    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    assert upload_problem(tmp_path / "small.png") is None
    with open(tmp_path / "big.jpg", "wb") as f:  # sparse: no disk is spent on it
        f.truncate(MAX_BYTES + 1)
    assert upload_problem(tmp_path / "big.jpg") == "the file has 20.0 MiB; the limit is 20 MiB"
    assert upload_problem(png_header(tmp_path / "wide.png", 8000, 8000)) == (
        "the image has 8000 x 8000 pixels; the limit is 40 megapixels"
    )
    assert upload_problem(png_header(tmp_path / "huge.png", 15000, 15000)) == (  # past PIL's own limit
        f"the image has over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels; the limit is 40"
    )
    (tmp_path / "notes.txt").write_text("not an image")
    assert upload_problem(tmp_path / "notes.txt") == "this is not an image file (JPEG, PNG, ...)"


def test_serve_on_a_port_in_use_says_so(tmp_path):
    """A second page on a port something listens on: one PipelineError naming the address and
    the option to change, not Gradio's advice about its environment variable."""
    from pipeline.io.errors import PipelineError
    from pipeline.serve.web import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PipelineError) as e:
            serve(None, "127.0.0.1", port)  # refused before any upload reaches the captioner
    assert str(e.value) == (
        f"127.0.0.1:{port}: the page cannot listen there (the port is in use, or the address is not this "
        "machine's); pass another `port` or `host`"
    )
