"""The web demo and JSON API, end to end over HTTP, and once through a real headless browser."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import picovlm
from picovlm.data.flickr8k import load_split
from picovlm.data.images import load_image
from picovlm.errors import UserError
from picovlm.generate import STRATEGIES, GenerationConfig
from picovlm.neighbours import add_index
from picovlm.serve import CaptionService, make_server


@pytest.fixture(scope="module")
def server(trained_run: Path, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("served") / "best"
    shutil.copytree(trained_run / "best", folder)
    add_index(folder, shapes_dir)  # so that every decoding the page offers runs, --mbr-neighbours too
    model = picovlm.load(str(folder))
    srv = make_server(model, "tiny-test-model", port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", model
    srv.shutdown()
    srv.server_close()


def _post(url: str, body: bytes, content_type: str = "image/jpeg") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _image(shapes_dir: Path, i: int = 0) -> Path:
    dev = load_split(shapes_dir, "dev")
    return dev.image_dir / dev.names[i]


def test_health_and_page(server, shapes_dir: Path) -> None:
    base, model = server
    with urllib.request.urlopen(base + "/health") as r:
        health = json.loads(r.read())
    assert health == {"status": "ok", "model": "tiny-test-model",
                      "params_unique": model.param_counts()["params_unique"],
                      "generation": dataclasses.asdict(GenerationConfig())}  # no generation_config.json: beam-3
    with urllib.request.urlopen(base + "/") as r:
        page = r.read().decode()
    assert 'id="file"' in page and 'id="strategy"' in page
    queries = [html.unescape(q) for q in re.findall(r'<option value="([^"]+)"', page)]  # what the page sends
    offered = [urllib.parse.parse_qs(q)["strategy"][0] for q in queries]
    assert "mbr" in offered and set(offered) <= set(STRATEGIES)  # the page offers only what the server takes
    assert "strategy=mbr&beam_width=8" in queries and "strategy=beam&beam_width=3&mirror=1" in queries
    for query in queries:  # and the server takes every option's query
        status, _ = _post(f"{base}/explain?{query}", _image(shapes_dir).read_bytes(), "image/png")
        assert status == 200, query
    assert '<option value="" selected>' in page  # the model's own decoding, first: a query without a strategy
    status, result = _post(f"{base}/explain?", _image(shapes_dir).read_bytes(), "image/png")
    assert status == 200 and result["strategy"] == "beam"


def test_a_request_without_a_strategy_gets_the_checkpoints_own_decoding(trained_run: Path) -> None:
    model = picovlm.load(str(trained_run / "best"))
    model.generation = {"strategy": "mbr", "beam_width": 4, "mirror": True}
    service = CaptionService(model, "m")
    assert service.options({}) == GenerationConfig(strategy="mbr", beam_width=4, mirror=True)
    assert service.options({"beam_width": ["2"]}) == GenerationConfig(strategy="mbr", beam_width=2, mirror=True)
    assert service.options({"strategy": ["greedy"]}) == GenerationConfig(strategy="greedy")
    with pytest.raises(UserError, match="strategy 'greedy' has none"):  # a 400 over HTTP
        service.options({"strategy": ["greedy"], "mbr_temperature": ["4"]})


@pytest.mark.parametrize("query, kwargs", [
    ("strategy=greedy", {"strategy": "greedy"}),
    ("strategy=beam", {"strategy": "beam"}),
    ("strategy=mbr", {"strategy": "mbr"}),
    ("strategy=greedy&mirror=1", {"strategy": "greedy", "mirror": True}),
    ("strategy=mbr&beam_width=8&mirror=true", {"strategy": "mbr", "beam_width": 8, "mirror": True}),
    ("strategy=mbr&beam_width=8&mbr_temperature=4", {"strategy": "mbr", "beam_width": 8, "mbr_temperature": 4.0}),
    ("strategy=beam&mirror=1&center_crop=0.75", {"strategy": "beam", "mirror": True, "center_crop": 0.75}),
    ("strategy=mbr&beam_width=4&mbr_neighbours=3", {"strategy": "mbr", "beam_width": 4, "mbr_neighbours": 3}),
])
def test_caption_matches_the_python_api(server, shapes_dir: Path, query: str, kwargs: dict) -> None:
    base, model = server
    image = _image(shapes_dir)
    status, result = _post(f"{base}/caption?{query}", image.read_bytes())
    assert status == 200 and result["caption"] == model.caption([image], **kwargs)[0]


def test_neighbours_without_an_index_are_a_user_error(trained_run: Path, shapes_dir: Path) -> None:
    service = CaptionService(picovlm.load(str(trained_run / "best")), "m")  # no neighbours.safetensors
    with pytest.raises(UserError, match="picovlm index"):  # a 400 over HTTP
        service.caption(load_image(_image(shapes_dir)), service.options(
            {"strategy": ["mbr"], "mbr_neighbours": ["30"]}))


def test_explain_returns_words_with_maps(server, shapes_dir: Path) -> None:
    base, model = server
    status, result = _post(f"{base}/explain?strategy=greedy", _image(shapes_dir).read_bytes(), "image/png")
    assert status == 200 and " ".join(w["word"] for w in result["words"]) == result["caption"]
    grid = model.cfg.cnn_grid
    for w in result["words"]:
        assert w["heatmap"].startswith("data:image/png;base64,")
        assert len(w["grid"]) == grid and 0 < w["mass"] <= 1 + 1e-5


@pytest.mark.parametrize("path, body, content_type, status, fragment", [
    ("/caption", b"hello", "text/plain", 415, "not an image"),
    ("/caption", b"\xff\xd8\xff garbage", "image/jpeg", 400, "cannot read image"),
    ("/caption", b"", "image/jpeg", 400, "empty"),
    ("/caption?strategy=nucleus", b"x", "image/jpeg", 400, "unknown strategy"),
    ("/caption?beam_width=three", b"x", "image/jpeg", 400, "must be a number"),
    ("/caption?mirror=maybe", b"x", "image/jpeg", 400, "mirror must be 1 or 0"),
    ("/nowhere", b"x", "image/jpeg", 404, "no endpoint"),
])
def test_bad_uploads_get_clear_errors(server, path: str, body: bytes, content_type: str, status: int,
                                      fragment: str) -> None:
    got, result = _post(server[0] + path, body, content_type)
    assert got == status and fragment in result["error"]


def test_oversized_upload_is_refused_before_reading_it(server) -> None:
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server[0])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/caption")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(10 * 1024 * 1024 + 1))
    conn.endheaders()  # the body is never sent: the server answers from the header alone
    response = conn.getresponse()
    assert response.status == 413 and "limit is 10 MB" in json.loads(response.read())["error"]
    conn.close()


def test_concurrent_requests_are_all_served(server, shapes_dir: Path) -> None:
    base, model = server
    images = [_image(shapes_dir, i) for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda p: _post(f"{base}/caption?strategy=greedy", p.read_bytes()), images))
    assert [r[0] for r in results] == [200] * 6
    assert [r[1]["caption"] for r in results] == model.caption(images, strategy="greedy")


def test_page_in_headless_chromium(server, shapes_dir: Path) -> None:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver; scripts/test.sh installs them when run as root")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, model = server
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(base + "/")
        image = _image(shapes_dir, 1)
        driver.find_element(By.ID, "file").send_keys(str(image))
        for option, kwargs in (("strategy=greedy", {"strategy": "greedy"}),
                               ("strategy=mbr&beam_width=8", {"strategy": "mbr", "beam_width": 8})):
            Select(driver.find_element(By.ID, "strategy")).select_by_value(option)
            driver.find_element(By.ID, "go").click()
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "caption").text not in ("", "…"))
            assert driver.find_element(By.ID, "caption").text == model.caption([image], **kwargs)[0], option
            assert len(driver.find_elements(By.CSS_SELECTOR, "#maps figure")) == len(
                driver.find_element(By.ID, "caption").text.split())
        assert "tiny-test-model" in driver.find_element(By.ID, "model").text
    finally:
        driver.quit()
