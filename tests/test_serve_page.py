"""The web page in a real headless chromium (selenium, system driver): generate from a typed prompt and check the
image with the shapes reader; paint a mask over an init image and inpaint; the page loads nothing from elsewhere.

Set LDM_SERVE_SCREENSHOT=path.png to save a screenshot of the page after the inpainting (README's picture).
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from browser import ensure_chromium, headless_chromium
from ldm.demo.reader import read_attributes
from ldm.demo.shapes import Attributes

pytestmark = pytest.mark.slow  # starts processes

PROMPT = "a large red circle in the center on a black background"


@pytest.fixture(scope="module")
def page(serve_server):
    ensure_chromium()
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chromium()
    try:
        driver.execute_cdp_cmd("Network.enable", {})  # basic auth on every request the page makes, as a browser would
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": serve_server.headers})
        driver.get(serve_server.url + "/")
        WebDriverWait(driver, 60).until(lambda d: d.find_element("id", "status").text == "ready")
        yield driver
    finally:
        driver.quit()


def wait_for_results(driver, count: int):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 120).until(
        lambda d: len(d.find_elements("css selector", "img.result-image")) >= count
        or "error" in d.find_element("id", "status").get_attribute("class"))
    assert "error" not in driver.find_element("id", "status").get_attribute("class"), \
        driver.find_element("id", "status").text
    return driver.find_elements("css selector", "img.result-image")[0]  # the newest comes first


def image_of(element) -> Image.Image:
    src = element.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def test_typed_prompt_generates_what_it_says(page):
    page.find_element("id", "prompt").send_keys(PROMPT)
    page.find_element("id", "negative").send_keys("blurry")
    seed = page.find_element("id", "seed")
    seed.clear()
    seed.send_keys("0")
    page.find_element("id", "generate").click()
    image = image_of(wait_for_results(page, 1))
    assert read_attributes(image) == Attributes("circle", "red", "black", "large", "center")
    caption = page.find_element("css selector", "figure.result pre.parameters").text
    assert caption.startswith(PROMPT) and "Seed: 0" in caption and "Negative prompt: blurry" in caption
    # the page's own resources are all from this server: nothing fetched from elsewhere
    urls = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(page.current_url.rstrip("/")) for u in urls), urls
    page.find_element("id", "seed").clear()
    page.find_element("id", "reuse-seed").click()
    assert page.find_element("id", "seed").get_attribute("value") == "0"


def test_paint_a_mask_and_inpaint(page):
    from selenium.webdriver.common.action_chains import ActionChains

    first = page.find_element("css selector", "figure.result button.send-to-img2img")
    init = image_of(page.find_element("css selector", "img.result-image"))
    first.click()  # the gallery's image becomes the init image, and the img2img tab opens
    canvas = page.find_element("id", "mask-canvas")
    assert canvas.is_displayed()
    page.find_element("id", "prompt").clear()
    page.find_element("id", "prompt").send_keys("a large blue circle in the center on a black background")
    brush = page.find_element("id", "brush")
    page.execute_script("arguments[0].value = 64", brush)
    # two strokes down the left part of the 256-px canvas (32 image px: 8 display px each)
    w = canvas.size["width"]
    actions = ActionChains(page)
    for x in (-w // 2 + 20, -w // 2 + 60):
        actions.move_to_element_with_offset(canvas, x, -w // 2 + 5).click_and_hold()
        actions.move_by_offset(0, w - 10).release()
    actions.perform()
    mask_url = page.execute_script("return window.ldm.maskDataURL()")
    assert mask_url, "the strokes painted nothing"
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask_url.split(",", 1)[1]))).convert("L"))
    assert mask[4:28, :4].all() and not mask[:, 20:].any()  # a strip on the left only
    page.find_element("id", "steps").clear()
    page.find_element("id", "steps").send_keys("10")
    page.find_element("id", "generate").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 120).until(lambda d: len(d.find_elements("css selector", "img.result-image")) >= 2
                                   or "error" in d.find_element("id", "status").get_attribute("class"))
    assert "error" not in page.find_element("id", "status").get_attribute("class")
    out = np.asarray(image_of(page.find_elements("css selector", "img.result-image")[0]))
    keep = mask < 128
    assert np.array_equal(out[keep], np.asarray(init)[keep])  # outside the painted mask: the init image exactly
    assert not np.array_equal(out[~keep], np.asarray(init)[~keep])  # inside it: repainted
    assert "Mask blur: 4" in page.find_elements("css selector", "figure.result pre.parameters")[0].text
    if os.environ.get("LDM_SERVE_SCREENSHOT"):
        page.execute_script("window.scrollTo(0, 0)")
        page.save_screenshot(os.environ["LDM_SERVE_SCREENSHOT"])


def test_refiner_choice_is_sent_as_a1111s_refiner_checkpoint(page):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    refiner = Select(page.find_element("id", "refiner"))
    assert [o.text for o in refiner.options][0] == "None" and len(refiner.options) >= 2
    refiner.select_by_index(1)  # the demo model: not an SDXL refiner, so the server refuses it in one line
    page.find_element("id", "prompt").send_keys(PROMPT)
    page.find_element("id", "generate").click()
    status = page.find_element("id", "status")
    WebDriverWait(page, 60).until(lambda d: "refiner" in status.text)
    assert "error" in status.get_attribute("class") and "is not an SDXL refiner" in status.text
    refiner.select_by_index(0)
