"""The demo page in a real browser (headless Chromium through Selenium) and its ``POST /score`` over real HTTP.

A server bound to 127.0.0.1 on a free port serves a tiny random model (``gamma_test``, saved to disk): its scores mean
nothing, but they must equal :class:`gamma.Scorer`'s for the same file. The browser tests skip, saying why, where
Chromium, chromedriver, Selenium or Gradio is absent (``.ci/run`` installs Debian's ``chromium`` and
``chromium-driver``).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gamma

pytest.importorskip("gradio", reason="the demo needs gradio (the demo extra)")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TIMEOUT = 30.0


def _photo(path: Path, name: str = "astronaut", size: int | None = None) -> Path:
    from skimage import data

    img = Image.fromarray(getattr(data, name)())
    if size:
        img = img.resize((size, size))
    img.save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="gamma_demo_") as tmp:
        root = Path(tmp)
        from gamma.weights import save_checkpoint

        torch.manual_seed(0)
        weights = save_checkpoint(gamma.create_model("gamma_test"), root / "tiny.pt")
        _photo(root / "astronaut.jpg")
        _photo(root / "coffee.jpg", "coffee")
        good = (root / "astronaut.jpg").read_bytes()
        (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
        (root / "notes.txt").write_text("not an image\n")
        yield root, weights


@pytest.fixture(scope="module")
def server(workdir):
    from gamma.demo.app import DemoServer
    from gamma.demo.service import DemoService

    root, weights = workdir
    service = DemoService(weights, max_pixels=1_000_000, max_upload_bytes=2 * 2**20)
    srv = DemoServer(service, host="127.0.0.1", port=0)
    url = srv.start()
    try:
        yield url, service
    finally:
        srv.stop()
    assert not srv.thread.is_alive(), "the server thread did not stop"


def _reference(weights: Path, path: Path) -> float:
    from gamma.scorer import Scorer

    return float(Scorer(weights).score([str(path)])["score"][0])


def _post(url: str, name: str, data: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/score", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ------------------------------------------------------------------------------------------------ HTTP
def test_post_score_equals_scorer_and_survives_bad_input(server, workdir):
    url, _ = server
    root, weights = workdir
    photo = root / "astronaut.jpg"
    expected = _reference(weights, photo)

    status, body = _post(url, "astronaut.jpg", photo.read_bytes())
    assert status == 200, body
    assert abs(body["score"] - expected) <= 1e-6
    assert set(body["distribution"]) == {"bad", "poor", "fair", "good", "perfect"}
    assert abs(sum(body["distribution"].values()) - 1) < 1e-5
    assert set(body["attributes"]) == {"sharpness", "contrast", "brightness", "colorfulness", "noisiness"}

    bad = {
        "truncated.jpg": ((root / "truncated.jpg").read_bytes(), 422, "truncated"),
        "notes.txt": ((root / "notes.txt").read_bytes(), 422, "not an image"),
        "huge.png": (_png(1200, 1000), 422, "pixels"),  # 1.2 million pixels, over the server's 1 million
        "big.bin": (b"\0" * (2 * 2**20 + 10), 413, "at most 2 MB"),
    }
    for name, (data, code, words) in bad.items():
        status, body = _post(url, name, data)
        assert status == code, (name, body)
        assert name in body["error"] and words in body["error"], (name, body)

    status, body = _post(url, "astronaut.jpg", photo.read_bytes())  # still serving, still the same score
    assert status == 200 and abs(body["score"] - expected) <= 1e-6


def test_gradio_api_refuses_server_paths(server, workdir):
    """The ``score`` API endpoint takes uploaded files only: a path on the server is refused, not read."""
    url, _ = server
    root, _ = workdir
    payload = json.dumps({"data": [{"path": str(root / "astronaut.jpg"), "meta": {"_type": "gradio.FileData"}}]})
    request = urllib.request.Request(f"{url}/gradio_api/call/score", data=payload.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
        event_id = json.loads(resp.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/score/{event_id}", timeout=TIMEOUT) as resp:
        stream = resp.read().decode()
    assert "event: error" in stream and "event: complete" not in stream, stream


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ browser
@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"the browser tests need Chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}); Debian: "
                    "apt-get install chromium chromium-driver (.ci/run does)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gamma_chromium_")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _score_in_page(driver, url: str, path: Path) -> tuple[str, str]:
    """Open the page, upload ``path`` on the Score tab, press Score; (the score shown, the message shown)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, TIMEOUT)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#score-files input[type=file]"))
    upload.send_keys(str(path))
    wait.until(lambda d: path.stem in d.find_element(By.ID, "score-files").text)  # (the name spans elements)
    driver.find_element(By.ID, "score-button").click()

    def done(d):
        value = d.find_element(By.CSS_SELECTOR, "#score-value textarea, #score-value input").get_attribute("value")
        message = d.find_element(By.ID, "score-message").text
        return (value, message) if (value or "Error" in message or "Scored" in message) else False

    return wait.until(done)


def test_page_scores_a_photo_then_survives_a_corrupt_file(server, workdir, browser):
    url, _ = server
    root, weights = workdir
    t0 = time.perf_counter()
    photo = root / "coffee.jpg"
    expected = _reference(weights, photo)

    shown, message = _score_in_page(browser, url, photo)
    assert "Scored 1 image" in message
    assert abs(float(shown) - expected) <= 5e-7, (shown, expected)  # shown with 6 decimals

    shown, message = _score_in_page(browser, url, root / "truncated.jpg")
    assert shown == "" and "truncated.jpg: cannot score this file" in message and "truncated" in message

    shown, _ = _score_in_page(browser, url, photo)  # the next good image still scores
    assert abs(float(shown) - expected) <= 5e-7
    assert time.perf_counter() - t0 < 60


def test_report_opens_without_console_errors(workdir, browser):
    from gamma.report import write_report

    root, weights = workdir
    from gamma.scorer import Scorer

    df = Scorer(weights, attributes=True).score([str(root / "astronaut.jpg"), str(root / "coffee.jpg")])
    df.to_csv(root / "scores.csv", index=False)
    html = write_report(root / "scores.csv", root / "report.html", images=True, root="/")
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get(html.as_uri())
    from selenium.webdriver.common.by import By

    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 4  # histogram, scatter, two thumbnails at least
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


# ------------------------------------------------------------------------------------------------ the other tabs
def test_rank_adapt_and_experts_through_the_api(server, workdir):
    """The Rank, Adapt and Experts events over HTTP with gradio's own client (files uploaded, as the page does)."""
    from gradio_client import Client, handle_file

    url, _ = server
    root, weights = workdir
    names = ("astronaut", "chelsea", "coffee", "rocket", "camera")
    for name in names:
        if not (root / f"{name}.jpg").exists():
            _photo(root / f"{name}.jpg", name)
    files = [str(root / f"{n}.jpg") for n in names]
    client = Client(url, verbose=False)
    gallery, table, csv_path, message = client.predict([handle_file(f) for f in files], "", api_name="/rank")
    from gamma.scorer import Scorer

    expected = Scorer(weights).score(files)
    order = [Path(f).name for f in expected.sort_values("score", ascending=False)["name"]]
    assert [row[0] for row in table["data"]] == order and "Ranked 5" in message
    lines = Path(csv_path).read_text().splitlines()
    assert lines[0] == "rank,name,score,error" and [ln.split(",")[1] for ln in lines[1:]] == order

    mos = {"astronaut.jpg": 70, "chelsea.jpg": 55, "coffee.jpg": 40, "rocket.jpg": 62, "camera.jpg": 30}
    text = "\n".join(f"{k}, {v}" for k, v in mos.items())
    report, adapted = client.predict([handle_file(f) for f in files], text, None, [handle_file(files[0])], "",
                                     api_name="/adapt")
    assert "in-sample" in report and "leave-one-out" in report and "5 pairs" in report
    assert adapted["headers"][:3] == ["name", "score", "adapted"] and 30 <= adapted["data"][0][2] <= 70
    report, _ = client.predict([handle_file(f) for f in files[:2]], text, None, None, "", api_name="/adapt")
    assert "at least 4" in report  # refuses to fit two pairs

    _, message = client.predict(handle_file(files[0]), "", api_name="/experts")
    assert "Mean router weight" in message
    weights_, labels = server[1].routing(Path(files[0]).read_bytes(), "astronaut.jpg")
    assert labels == ["image block 2", "image block 3"] and np.allclose(weights_.sum(axis=1), 1, atol=1e-6)


def test_import_gamma_and_help_load_no_gradio_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys, gamma, gamma.cli; gamma.cli.build_parser().format_help(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'gradio', 'matplotlib', 'fastapi', 'selenium'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_demo_follows_the_prompt_set_rule(tmp_path):
    """gamma demo --weights Gamma-Prompt.pth (release layout, no record) serves SDP prompts; --prompt-set against a
    file's record is refused unless --prompt-set-override."""
    from gamma.cli import build_parser
    from gamma.demo import make_service
    from gamma.hub import PromptSetError
    from gamma.weights import release_state_dict, save_checkpoint

    torch.manual_seed(0)
    model = gamma.create_model("gamma_test")
    torch.save(release_state_dict(model), tmp_path / "Gamma-Prompt.pth")
    ours = save_checkpoint(model, tmp_path / "ours.pth")
    parse = build_parser().parse_args
    sdp = make_service(parse(["demo", "--weights", str(tmp_path / "Gamma-Prompt.pth"), "--device", "cpu"]))
    assert sdp.describe().endswith("prompts sdp") and sdp.scenes[0] == "auto"
    refused = make_service(parse(["demo", "--weights", str(ours), "--prompt-set", "sdp", "--device", "cpu"]))
    with pytest.raises(PromptSetError, match="records prompt set 'naive'"):
        refused.scorer()
    meant = make_service(parse(["demo", "--weights", str(ours), "--prompt-set", "sdp", "--prompt-set-override",
                                "--device", "cpu"]))
    assert meant.describe().endswith("prompts sdp")


def test_without_weights_the_page_and_the_service_say_so(tmp_path, monkeypatch):
    from gamma.cli import build_parser
    from gamma.demo import make_service
    from gamma.demo.app import build_blocks
    from gamma.demo.service import DemoInputError

    monkeypatch.setenv("GAMMA_HOME", str(tmp_path))
    monkeypatch.delenv("GAMMA_WEIGHTS", raising=False)
    service = make_service(build_parser().parse_args(["demo"]))
    assert service.weights is None and "no weight file for 'gamma'" in service.missing
    assert str(tmp_path / "Gamma.pth") in service.missing
    with pytest.raises(DemoInputError, match="no weight file"):
        service.score_bytes(b"\x89PNG", "a.png")
    page = json.dumps(build_blocks(service).config["components"])
    assert "No weights found" in page and "gamma demo --weights FILE" in page
