"""The web page's models panel, driven in headless chromium through selenium: the catalog with sizes and licences, a
pull from the hub stand-in (tests/catalog_hub.py) with its progress, a removal, and the errors, against the real
waitress server on an empty models folder."""

import json

import pytest
import requests
from catalog_hub import LIBRARY, catalog_files, catalog_hub, tiny_sd1_checkpoint
from conftest import element, open_page, severe_console_messages, wait_until
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

DREAMSHAPER = "checkpoints/dreamshaper_8.safetensors"
TAESD = "vae_approx/taesd_decoder.safetensors"  # dreamshaper-8's previews' decoder, which the pull brings with it
# Every status the panel says, and whether all its buttons were disabled as it said it, in window.said.
RECORD_STATUS = """window.said = [];
new MutationObserver(() => window.said.push([document.getElementById('models-status').textContent,
    [...document.querySelectorAll('#catalog button')].every((b) => b.disabled)]))
    .observe(document.getElementById('models-status'), {childList: true, characterData: true, subtree: true});"""
ROWS = "return [...document.querySelectorAll('#catalog tbody tr')].map((tr) => [...tr.cells].map((c) => c.innerText))"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The catalog's files on the stand-in: DreamShaper 8 a tiny SD1 checkpoint (the model menu reads its family),
    the others noise (no test here draws or fetches them)."""
    return catalog_files({"dreamshaper_8": tiny_sd1_checkpoint(tmp_path_factory.mktemp("tiny-sd1"))[0]})


@pytest.fixture
def hub(files, monkeypatch):
    """The stand-in serving the catalog's repos, FLUX.1-dev gated; huggingface_hub pointed at it."""
    with catalog_hub(files, monkeypatch) as server:
        yield server


@pytest.fixture
def page(browser, make_engine, serve, hub, tmp_path):
    """(the browser on the page of a server with an empty models folder, its models panel open; that folder; the
    server's URL)."""
    models = tmp_path / "models"
    url = serve(make_engine(model="demo", models_dir=models))
    open_page(browser, url)
    open_panel(browser)
    browser.execute_script(RECORD_STATUS)
    return browser, models, url


def open_panel(browser):
    element(browser, "models-panel").find_element(By.TAG_NAME, "summary").click()
    wait_until(lambda: rows(browser), "the panel lists the catalog")


def rows(browser) -> dict:
    """The panel's rows by model name: [name cell, family, size, licence, here, action]."""
    return {cells[0].splitlines()[0]: cells for cells in browser.execute_script(ROWS)}


def press(browser, label):
    browser.find_element(By.CSS_SELECTOR, f'#catalog button[aria-label="{label}"]').click()


def status(browser) -> str:
    return element(browser, "models-status").text


def model_menu(browser) -> list:
    return [option.text for option in Select(element(browser, "model")).options]


def pull_dreamshaper(browser):
    press(browser, "Pull dreamshaper-8:fp16")
    wait_until(lambda: status(browser).startswith(("success", "failed")), "the pull ends")
    assert status(browser) == "success: dreamshaper-8 is in the model menu", element(browser, "error").text


def test_the_panel_lists_the_catalog_with_sizes_licences_and_what_the_bare_name_takes(page):
    browser, _, _ = page
    listed = rows(browser)
    assert list(listed) == [variant.label for entry in LIBRARY.entries.values() for variant in entry.variants.values()]
    assert listed["dreamshaper-8:fp16"][1:] == ["sd1", "2.0 GB", "CreativeML Open RAIL-M", "", "Pull"]
    dev = listed["flux1-dev:bf16"][3]
    assert dev.startswith("FLUX.1 [dev] Non-Commercial License, non-commercial; gated: the server needs HF_TOKEN")
    takes = [name for name, cells in listed.items() if 'what "flux2-klein-4b" takes here' in cells[0]]
    assert len(takes) == 1
    reason = browser.execute_script(
        f"return [...document.querySelectorAll('#catalog th')].find((th) => th.innerText.startsWith('{takes[0]}'))"
        ".querySelector('small').title"
    )
    assert "it needs about" in reason and "this machine has" in reason
    assert severe_console_messages(browser) == []


def test_the_open_panel_fits_a_phone_sized_screen_without_sideways_scrolling(page):
    browser, _, _ = page
    browser.set_window_size(390, 844)
    width = browser.execute_script("return document.documentElement.clientWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width


def test_pull_shows_each_files_progress_then_success_and_the_model_menu_offers_and_chooses_the_model(page, files):
    browser, models, _ = page
    pull_dreamshaper(browser)
    said = browser.execute_script("return window.said")
    assert said[0] == ["pulling dreamshaper-8:fp16…", True]
    megabytes = f"{len(files['dreamshaper_8']) / 2**20:.1f}"
    assert said[1] == [f"pulling dreamshaper-8:fp16: {megabytes} MB to fetch", True]
    assert [f"downloading {DREAMSHAPER}", True] in said and [f"verifying sha256 {DREAMSHAPER}", True] in said
    assert said[-1][0] == "success: dreamshaper-8 is in the model menu"
    small = f"{len(files['taesd_decoder']) / 2**20:.1f}"
    assert element(browser, "pull-files").text == (
        f"{DREAMSHAPER}: verifying sha256, {megabytes} of {megabytes} MB\n"
        f"{TAESD}: verifying sha256, {small} of {small} MB"
    )
    bar = browser.find_element(By.CSS_SELECTOR, "#pull-files progress")
    assert bar.get_attribute("aria-label") == DREAMSHAPER and bar.get_attribute("value") == bar.get_attribute("max")
    assert (models / DREAMSHAPER).read_bytes() == files["dreamshaper_8"]
    assert "dreamshaper-8" in model_menu(browser)
    assert element(browser, "model").get_attribute("value") == "dreamshaper-8"
    assert not element(browser, "demo-note").is_displayed()  # the menu's change ran: the pulled model's settings
    assert rows(browser)["dreamshaper-8:fp16"][4:] == ["yes", "Delete"]
    assert not any(b.get_attribute("disabled") for b in browser.find_elements(By.CSS_SELECTOR, "#catalog button"))
    assert severe_console_messages(browser) == []


def test_delete_asks_first_then_removes_the_model_from_the_disk_the_panel_and_the_menu(page):
    browser, models, _ = page
    pull_dreamshaper(browser)
    press(browser, "Delete dreamshaper-8")
    browser.switch_to.alert.dismiss()
    assert (models / DREAMSHAPER).is_file() and "dreamshaper-8" in model_menu(browser)
    press(browser, "Delete dreamshaper-8")
    browser.switch_to.alert.accept()
    wait_until(lambda: status(browser).startswith("removed"), "the page says what it removed")
    assert status(browser) == f"removed dreamshaper-8: {DREAMSHAPER}, {TAESD}"
    assert not (models / DREAMSHAPER).exists()
    wait_until(lambda: "dreamshaper-8" not in model_menu(browser), "the menu leaves the model out")
    assert element(browser, "model").get_attribute("value") == "demo"
    assert rows(browser)["dreamshaper-8:fp16"][4:] == ["", "Pull"]
    assert severe_console_messages(browser) == []


def test_a_refused_pull_shows_the_servers_error_and_frees_the_buttons(page):
    browser, models, _ = page
    press(browser, "Pull flux1-dev:bf16")  # gated, and the server has no HF_TOKEN: 403
    wait_until(lambda: status(browser).startswith("failed"), "the page says the pull failed")
    error = element(browser, "error")
    assert error.is_displayed() and "black-forest-labs/FLUX.1-dev is gated" in error.text and "HF_TOKEN" in error.text
    assert status(browser) == f"failed: {error.text}"
    assert not any(b.get_attribute("disabled") for b in browser.find_elements(By.CSS_SELECTOR, "#catalog button"))
    assert not (models / "diffusion_models").exists()
    # The one console error is the browser's own note of the 403 answer.
    [logged] = severe_console_messages(browser)
    assert "/pull" in logged["message"] and "403" in logged["message"]


def test_a_pull_that_fails_as_it_streams_shows_its_last_line(page, hub):
    browser, models, _ = page
    remote = LIBRARY.entries["dreamshaper-8"].variants["fp16"].files[0]
    hub.corrupt(f"{remote.repo}/{remote.path}")
    press(browser, "Pull dreamshaper-8:fp16")
    wait_until(lambda: status(browser).startswith("failed"), "the page says the pull failed")
    assert "came damaged" in element(browser, "error").text
    assert "dreamshaper-8" not in model_menu(browser) and not (models / DREAMSHAPER).exists()
    assert severe_console_messages(browser) == []


def test_a_model_pulled_from_a_url_is_listed_as_the_panel_opens_and_may_be_deleted(page, hub):
    browser, models, url = page
    remote = LIBRARY.entries["dreamshaper-8"].variants["fp16"].files[0]
    pulled = requests.post(f"{url}/pull", json={"model": f"hf.co/{remote.repo}/{remote.path}"}, timeout=60)
    assert json.loads(pulled.text.splitlines()[-1])["model"] == "DreamShaper_8_pruned"
    summary = element(browser, "models-panel").find_element(By.TAG_NAME, "summary")
    summary.click()  # closed, then opened again
    summary.click()
    wait_until(lambda: "DreamShaper_8_pruned" in rows(browser), "the panel lists the model pulled from a URL")
    assert rows(browser)["DreamShaper_8_pruned"][3:] == ["pulled from a URL", "yes", "Delete"]
    assert "DreamShaper_8_pruned" in model_menu(browser)  # the menu too is as the server has it now
    press(browser, "Delete DreamShaper_8_pruned")
    browser.switch_to.alert.accept()
    wait_until(lambda: status(browser).startswith("removed"), "the page says what it removed")
    assert "DreamShaper_8_pruned" not in rows(browser) and list((models / "checkpoints").iterdir()) == []
    assert severe_console_messages(browser) == []
