"""Take the README's and docs' screenshots of the demo page and of a report, in headless Chromium.

    python scripts/screenshots.py            # a tiny random model (gamma_test): the numbers mean nothing
    python scripts/screenshots.py --weights experiments/demo_gamma/split_1/best.pth --label demo-trained

Each image gets a caption strip naming the model it shows, and the label is in the file name
(docs/images/demo_score_<label>.png, demo_experts_<label>.png, report_<label>.png). The photos are the ones
scikit-image ships. Needs the demo extra, selenium, /usr/bin/chromium and /usr/bin/chromedriver.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import gamma
from gamma.demo.app import DemoServer
from gamma.demo.service import DemoService
from gamma.report import write_report

REPO = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")


def _browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--window-size=1200,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _caption(path: Path, text: str, width: int | None = None) -> None:
    """Add a caption strip on top, shrink to ``width`` and store as a palette PNG (small files in the repository)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    if width and img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    out = Image.new("RGB", (img.width, img.height + 28), "white")
    out.paste(img, (0, 28))
    ImageDraw.Draw(out).text((8, 8), text, fill=(160, 0, 0))
    out.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a weight file (default: a tiny random gamma_test model)")
    parser.add_argument("--label", help="the model's label in captions and file names (default: tiny or the file)")
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "images"))
    args = parser.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from skimage import data

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gamma_shots_"))
    weights = args.weights
    label = args.label or ("tiny" if weights is None else Path(weights).stem)
    if weights is None:
        from gamma.weights import save_checkpoint

        torch.manual_seed(0)
        weights = save_checkpoint(gamma.create_model("gamma_test"), work / "gamma_test.pt")
        caption = "gamma demo with a tiny RANDOM model (gamma_test): the numbers mean nothing"
    else:
        caption = f"gamma demo with {weights} ({label})"
    photos = work / "photos"
    photos.mkdir()
    for name in PHOTOS:
        image = getattr(data, name)()
        Image.fromarray(image).convert("RGB").save(photos / f"{name}.jpg", quality=90)

    service = DemoService(weights)
    with DemoServer(service) as url:
        driver = _browser(str(work / "profile"))
        wait = WebDriverWait(driver, 60)
        try:
            driver.get(url)
            upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#score-files input[type=file]"))
            upload.send_keys(str(photos / "coffee.jpg"))
            wait.until(lambda d: "coffee" in d.find_element(By.ID, "score-files").text)
            driver.find_element(By.ID, "score-button").click()
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#score-value textarea").get_attribute("value"))
            time.sleep(1.5)  # the bar chart draws after the value
            shot = out / f"demo_score_{label}.png"
            driver.save_screenshot(str(shot))
            _caption(shot, caption, width=1000)

            driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Experts')]").click()
            upload = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "input[type=file]")
                                           if e.find_elements(By.XPATH, "ancestor::*[contains(@class,'tabitem')]")
                                           and e.find_element(By.XPATH, "ancestor::*[contains(@class,'tabitem')]")
                                           .is_displayed()])
            upload[0].send_keys(str(photos / "astronaut.jpg"))
            time.sleep(1.5)
            driver.find_element(By.XPATH, "//button[contains(., 'Show routing')]").click()
            wait.until(lambda d: "Mean router weight" in d.page_source)
            time.sleep(1.5)
            shot = out / f"demo_experts_{label}.png"
            driver.save_screenshot(str(shot))
            _caption(shot, caption, width=1000)

            scores = work / "scores.csv"
            service.scorer().score(sorted(str(p) for p in photos.iterdir())).to_csv(scores, index=False)
            report = write_report(scores, work / "report.html", images=True, root="/",
                                  title=f"gamma report ({label} model)")
            driver.set_window_size(1200, 1500)
            driver.get(report.as_uri())
            time.sleep(1)
            shot = out / f"report_{label}.png"
            driver.save_screenshot(str(shot))
            _caption(shot, caption.replace("gamma demo", "gamma report"), width=900)
        finally:
            driver.quit()
    for path in sorted(out.glob(f"*_{label}.png")):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
