"""The web page at /, driven in Debian's headless chromium through selenium, against the real waitress server on
the tiny demo model."""

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import requests
from conftest import (
    FAST,
    element,
    fill_form,
    finished,
    noise_picture,
    open_page,
    pixels,
    png_data,
    serving,
    severe_console_messages,
    wait_until,
)
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

import imagine


def record_picture_changes(browser):
    """Keeps every picture the page shows, in order, in window.shown (a MutationObserver misses no change)."""
    browser.execute_script(
        """window.shown = [];
        new MutationObserver((records) => records.forEach(() => window.shown.push(
            document.getElementById('picture').src))).observe(document.getElementById('picture'), {attributes: true});
        """
    )


def shown_picture(browser) -> np.ndarray:
    src = element(browser, "picture").get_attribute("src")
    return pixels(src.partition(",")[2])


def api_picture(url, body) -> np.ndarray:
    request = urllib.request.Request(url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return pixels(json.load(response)["img"])


def health(url) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        return json.load(response)


def test_the_page_loads_without_console_errors_with_strict_security_headers(browser, live_server):
    open_page(browser, live_server)
    assert element(browser, "model").get_attribute("value") == "demo"
    assert element(browser, "status").text == "ready"
    assert severe_console_messages(browser) == []
    with urllib.request.urlopen(urllib.request.Request(live_server + "/", headers={"Accept": "text/html"})) as page:
        assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["X-Frame-Options"] == "DENY"


def test_generate_draws_previews_as_they_stream_then_the_apis_picture_and_keeps_it_in_history(browser, live_server):
    open_page(browser, live_server)
    fill_form(browser, "a lighthouse at dusk", steps=8, seed=1234)
    record_picture_changes(browser)
    element(browser, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard way to generate
    wait_until(lambda: finished(browser), "the page finished the picture")

    shown = browser.execute_script("return window.shown")
    previews, final = shown[:-1], shown[-1]
    assert len(set(previews)) >= 2, "fewer than two different preview frames were drawn before the final picture"
    expected = api_picture(live_server, {"prompt": "a lighthouse at dusk", **FAST, "num_steps": 8, "seed": 1234})
    assert np.array_equal(pixels(final.partition(",")[2]), expected)
    assert element(browser, "progress-text").text.startswith("step 8 / 8")

    history = browser.find_elements(By.CSS_SELECTOR, "#history img")
    assert len(history) == 1
    assert np.array_equal(pixels(history[0].get_attribute("src").partition(",")[2]), expected)
    browser.refresh()  # the history outlives the page
    open_page(browser, live_server)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#history img")) == 1
    assert severe_console_messages(browser) == []


def test_cancel_stops_the_generation_and_a_screenshot_mid_generation_shows_the_page(browser, live_server, tmp_path):
    open_page(browser, live_server)
    fill_form(browser, "a long walk", steps=150, seed=5, size=256)
    element(browser, "generate").click()
    wait_until(lambda: element(browser, "progress-text").text.startswith("step ") and not
               element(browser, "progress-text").text.startswith("step 0 "), "a preview arrived")  # fmt: skip
    screenshot = tmp_path / "mid-generation.png"
    browser.save_screenshot(str(screenshot))
    colours = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the screenshot is blank"
    assert health(live_server)["running"]

    element(browser, "cancel").click()
    wait_until(lambda: not health(live_server)["running"], "the server stopped generating", timeout=30)
    assert element(browser, "status").text == "cancelled"
    assert element(browser, "generate").is_enabled()


def test_img2img_with_a_painted_mask_produces_a_picture(browser, live_server, tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source)
    open_page(browser, live_server)
    element(browser, "init-file").send_keys(str(source))
    wait_until(lambda: element(browser, "mask").get_attribute("width") == "64", "the input picture was read")
    fill_form(browser, "a blue square", steps=8, seed=3)
    mask = element(browser, "mask")
    ActionChains(browser).move_to_element(mask).click_and_hold().move_by_offset(20, 10).release().perform()
    element(browser, "generate").click()
    wait_until(lambda: finished(browser) or element(browser, "error").text, "the page finished the picture")
    assert element(browser, "error").text == ""
    assert shown_picture(browser).shape == (64, 64, 3)
    [thumb] = browser.find_elements(By.CSS_SELECTOR, "#history img")
    history = browser.execute_script("return JSON.parse(localStorage.getItem('imagine.history'))")
    assert history[0]["params"]["inpaint"] is True  # the painted mask was sent
    assert history[0]["params"]["strength"] == 0.8
    assert base64.b64decode(thumb.get_attribute("src").partition(",")[2])


def test_a_key_protected_server_works_after_the_key_is_entered(browser, make_engine):
    engine = make_engine(model="demo", api_key="sesame")
    with serving(engine) as url:
        browser.get(url)
        wait_until(lambda: element(browser, "key-form").is_displayed(), "the page asked for the key")
        element(browser, "key").send_keys("sesame", Keys.ENTER)
        wait_until(lambda: element(browser, "status").text == "ready", "the page loaded its lists with the key")
        fill_form(browser, "a locked door", steps=2, seed=9)
        element(browser, "generate").click()
        wait_until(lambda: finished(browser) or element(browser, "error").text, "the page finished the picture")
        assert element(browser, "error").text == ""
        assert shown_picture(browser).shape == (64, 64, 3)
    engine.stop()


def test_no_web_serves_the_endpoint_list_even_to_a_browser(make_engine):
    engine = make_engine(model="demo", no_web=True)
    with serving(engine) as url:
        request = urllib.request.Request(url + "/", headers={"Accept": "text/html"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert "endpoints" in json.load(response)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/web/app.js", timeout=30)
        assert refused.value.code == 404
    engine.stop()


def test_the_page_fits_a_phone_sized_screen_without_sideways_scrolling(browser, live_server):
    browser.set_window_size(390, 844)
    open_page(browser, live_server)
    width = browser.execute_script("return document.documentElement.clientWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    assert element(browser, "generate").rect["x"] + element(browser, "generate").rect["width"] <= width


def test_the_pages_own_origin_may_post_but_another_local_port_may_not(make_engine):
    client = imagine.create_app(make_engine(model="demo")).test_client()
    body = {"prompt": "x", **FAST}
    own = client.post("/generate", json=body, headers={"Host": "127.0.0.1:5000", "Origin": "http://127.0.0.1:5000"})
    assert own.status_code == 200
    other = client.post("/generate", json=body, headers={"Host": "127.0.0.1:5000", "Origin": "http://127.0.0.1:3000"})
    assert other.status_code == 403


def test_with_an_api_key_the_page_loads_without_it_and_the_api_still_needs_it(make_engine):
    client = imagine.create_app(make_engine(model="demo", api_key="sesame")).test_client()
    page = client.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and b"/web/app.js" in page.data
    assert client.get("/web/app.js").status_code == 200
    assert client.get("/models").status_code == 401
    assert client.get("/web/imagine.py").status_code == 404


def test_no_web_comes_from_a_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("IMAGINE_NO_WEB", raising=False)
    assert imagine.parse_settings([]).no_web is False
    assert imagine.parse_settings(["--no-web"]).no_web is True
    monkeypatch.setenv("IMAGINE_NO_WEB", "1")
    assert imagine.parse_settings([]).no_web is True


def test_a_reload_during_a_generation_reattaches_to_its_job_with_its_settings_and_the_picture_arrives(
    browser, make_engine, serve, hold
):
    held = hold(3)  # the page has seen steps 1 and 2 and their previews
    live_server = serve(make_engine(model="demo", generate=held.generate))
    open_page(browser, live_server)
    fill_form(browser, "a sunrise over the sea", steps=8, seed=77)
    element(browser, "generate").click()
    wait_until(lambda: 3 in held.steps and element(browser, "progress-text").text.startswith("step 2 / 8"), "step 2")
    job_id = browser.execute_script("return JSON.parse(localStorage.getItem('imagine.job')).id")

    browser.refresh()  # mid-run: the job goes on, and the page finds it again
    wait_until(
        lambda: (
            element(browser, "progress-text").text.startswith("step 2 / 8")
            and element(browser, "picture").get_attribute("src").startswith("data:image/png")
        ),
        "the page reattached and shows the latest preview",
    )
    assert element(browser, "status").text == "generating…"
    assert pixels(element(browser, "picture").get_attribute("src").partition(",")[2]).shape == (64, 64, 3)  # forming
    form = {field: element(browser, field).get_attribute("value") for field in ("prompt", "num_steps", "seed", "width")}
    assert form == {"prompt": "a sunrise over the sea", "num_steps": "8", "seed": "77", "width": "64"}  # the job's own
    held.release()
    wait_until(lambda: finished(browser), "the picture arrived after the reload")

    expected = api_picture(live_server, {"prompt": "a sunrise over the sea", **FAST, "num_steps": 8, "seed": 77})
    assert np.array_equal(shown_picture(browser), expected)
    with urllib.request.urlopen(live_server + "/jobs", timeout=30) as response:
        assert [each["id"] for each in json.load(response)["jobs"]] == [job_id]  # the same job, not a new one
    assert browser.execute_script("return localStorage.getItem('imagine.job')") is None
    assert severe_console_messages(browser) == []


def test_a_page_refused_an_event_stream_follows_its_job_by_polling_and_the_picture_arrives(
    browser, make_engine, serve, hold
):
    held = hold(3)
    live_server = serve(make_engine(model="demo", max_queue=2, generate=held.generate))  # three event streams
    open_page(browser, live_server)
    body = {"prompt": "a sunrise over the sea", **FAST, "num_steps": 8, "seed": 77, "stream": 1}
    job_id = requests.post(f"{live_server}/jobs", json=body, timeout=30).json()["id"]
    held.reached(3)
    taken = [requests.get(f"{live_server}/jobs/{job_id}/events", stream=True, timeout=30) for _ in range(3)]
    assert all(response.status_code == 200 for response in taken)  # another client holds every stream there is

    script = "localStorage.setItem('imagine.job', JSON.stringify({id: arguments[0], body: arguments[1]}))"
    browser.execute_script(script, job_id, body)
    browser.refresh()  # the page reattaches to the job, and is refused a stream of its own
    wait_until(lambda: element(browser, "progress-text").text.startswith("step 2 / 8"), "the page polled step 2")
    assert element(browser, "status").text == "generating…"
    held.release()
    wait_until(lambda: finished(browser), "the picture arrived by polling")
    for response in taken:
        response.close()
    assert np.array_equal(shown_picture(browser), api_picture(live_server, body | {"stream": 0}))


# The first impression (issue 22.6): no broken picture before the first one, demo's size as the API draws it, a
# size menu that names the preset chosen, and a word that demo draws noise.


def test_before_any_picture_the_page_shows_no_picture_and_so_no_broken_image(browser, live_server):
    open_page(browser, live_server)
    assert element(browser, "picture").get_attribute("src") is None
    assert not element(browser, "picture").is_displayed()


def test_demos_size_on_the_page_is_the_apis_default_and_the_size_menu_names_it(browser, live_server, client):
    open_page(browser, live_server)
    assert element(browser, "model").get_attribute("value") == "demo"
    size = (element(browser, "width").get_attribute("value"), element(browser, "height").get_attribute("value"))
    answer = client.post("/generate", json={"prompt": "x", "num_steps": 1, "seed": 1}).get_json()
    assert size == (str(answer["width"]), str(answer["height"])) == ("512", "512")
    assert Select(element(browser, "preset")).first_selected_option.text == "512x512"


def test_the_size_menu_keeps_the_preset_chosen_and_says_custom_only_for_a_size_of_none(browser, live_server):
    open_page(browser, live_server)
    presets = Select(element(browser, "preset"))
    presets.select_by_visible_text("768x512")
    assert presets.first_selected_option.text == "768x512"
    assert element(browser, "width").get_attribute("value") == "768"
    element(browser, "height").send_keys("0")  # 5120: a size no preset has
    assert presets.first_selected_option.text == "custom"


def test_a_note_says_demo_draws_noise_while_demo_is_chosen(browser, live_server):
    open_page(browser, live_server)
    note = element(browser, "demo-note")
    assert note.is_displayed() and "noise" in note.text
    Select(element(browser, "model")).select_by_visible_text("tiny")
    assert not note.is_displayed()
    Select(element(browser, "model")).select_by_visible_text("demo")
    assert note.is_displayed()


def test_upscale_on_a_history_picture_adds_the_larger_picture_to_the_history(browser, live_server):
    small = noise_picture(32, 24)
    open_page(browser, live_server)
    entry = "[{img: arguments[0], params: {prompt: 'a fox', seed: 7}}]"
    browser.execute_script(f"localStorage.setItem('imagine.history', JSON.stringify({entry}))", png_data(small))
    browser.refresh()
    open_page(browser, live_server)
    assert Select(element(browser, "upscaler")).first_selected_option.text == "Lanczos"  # no models: the built-ins
    browser.find_element(By.XPATH, "//ol[@id='history']//button[text()='upscale']").click()
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#history img")) == 2, "the upscaled picture")
    newest = browser.find_elements(By.CSS_SELECTOR, "#history img")[0].get_attribute("src").partition(",")[2]
    assert np.array_equal(pixels(newest), np.asarray(small.resize((64, 48), Image.Resampling.LANCZOS)))
    assert element(browser, "status").text.startswith("upscaled to 64x48")
    assert severe_console_messages(browser) == []
