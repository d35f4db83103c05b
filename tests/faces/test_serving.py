"""The HTTP search service, started for real with uvicorn on a free loopback port and queried with httpx."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import factories
import httpx
import numpy as np
import pytest
from PIL import Image
from serving_checks import direct, one_line_detail, png, running, upgraded_to_v3, v3_sets_root
from typer.testing import CliRunner

from fct_registry.cli import app as cli
from fct_registry.core.errors import VersionMismatchError
from fct_registry.onnx_boundary.contract import InputContract
from fct_registry.onnx_boundary.embedding import embed_images
from fct_registry.onnx_boundary.images import read_image
from fct_registry.onnx_boundary.runtime import OnnxModel
from fct_registry.serving.app import create_app
from fct_registry.serving.server import serve
from fct_registry.usecases import promote
from fct_registry.vectors.embedding_set import EmbeddingSet
from fct_registry.vectors.search import index_for_set

MAX_UPLOAD = 64 * 1024
MAX_K = 100  # above the 50-item gallery: k is bounded by the gallery size


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> factories.World:
    return factories.shared_world(tmp_path_factory)


@pytest.fixture(scope="module")
def v3_sets(world, tmp_path_factory) -> Path:
    """A sets root holding the v1 gallery and its upgrade to v3 (the champion)."""
    return v3_sets_root(world, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def client(world, v3_sets) -> Iterator[httpx.Client]:
    app = create_app(world.registry, v3_sets, max_upload_bytes=MAX_UPLOAD, max_k=MAX_K)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def test_health_and_info_name_the_served_pair(client, world, v3_sets):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    v3 = world.versions["v3"]
    assert info["backbone"] | {"providers": None} == {
        "alias": "champion", "name": "fct-backbone", "version": v3.version, "label": "v3", "sha256": v3.ref.sha256,
        "input_shape": [1, 28, 28], "embedding_dim": factories.DIMS["v3"], "providers": None,
        "model_names": [f"fct-backbone/{v3.version}", str(v3.version), str(v3.ref)]}
    assert "CPUExecutionProvider" in info["backbone"]["providers"]
    gallery = info["gallery"]
    assert (gallery["path"], gallery["model"], gallery["count"], gallery["dim"], gallery["metric"]) == (
        str(v3_sets / "gallery_v1@v3"), str(v3.ref), 50, factories.DIMS["v3"], "l2")
    assert gallery["lineage"][-1].startswith("upgraded v2@")


def test_search_by_embedding_equals_direct_search(client, v3_sets):
    stored = EmbeddingSet.open(v3_sets / "gallery_v1@v3").read()
    index = index_for_set(EmbeddingSet.open(v3_sets / "gallery_v1@v3"))
    queries = [stored.embeddings[3], np.random.default_rng(0).normal(size=factories.DIMS["v3"]).astype(np.float32)]
    for query, k in zip(queries, (7, 50), strict=True):
        response = client.post("/search", json={"embedding": query.tolist(), "k": k})
        assert response.status_code == 200, response.text
        body = response.json()
        expected = index.search(query[None], k)
        assert body["ids"] == expected.ids[0].tolist()
        np.testing.assert_array_equal(np.float32(body["scores"]), expected.scores[0])
        assert (body["metric"], body["model"], body["query_model"]) == ("l2", str(index.model), "unchecked")
    by_param = client.post("/search", json={"embedding": queries[0].tolist()}, params={"k": 4}).json()["ids"]
    assert by_param == index.search(queries[0][None], 4).ids[0].tolist() and by_param[0] == stored.ids[3]


def test_search_by_png_upload_equals_embedding_the_image_directly(client, world, v3_sets):
    pixels = world.zoo.splits["test"].images[17:18]  # (1, 1, 28, 28) uint8
    expected = direct(world.zoo.dirs["v3"], v3_sets / "gallery_v1@v3", pixels, 5)
    response = client.post("/search", files={"image": ("q.png", png(pixels[0, 0]), "image/png")}, data={"k": "5"})
    assert response.status_code == 200, response.text
    assert response.json()["ids"] == expected.ids[0].tolist() and response.json()["query_model"] == "embedded"
    np.testing.assert_allclose(response.json()["scores"], expected.scores[0], rtol=1e-5, atol=1e-5)


def test_jpeg_of_another_size_is_decoded_like_the_cli(client, world, v3_sets, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(56, 40, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, "JPEG")
    (tmp_path / "q.jpg").write_bytes(jpeg.getvalue())
    # the CLI's `search` decoding
    pixels = read_image(tmp_path / "q.jpg", InputContract(height=28, width=28, color="grayscale"))
    expected = direct(world.zoo.dirs["v3"], v3_sets / "gallery_v1@v3", pixels, 3)
    response = client.post("/search", files={"image": ("q.jpg", jpeg.getvalue(), "image/jpeg")}, params={"k": 3})
    assert response.status_code == 200, response.text
    assert response.json()["ids"] == expected.ids[0].tolist()


def test_embedding_stating_the_served_model_in_any_form_is_matched(client, world, v3_sets):
    v3 = world.versions["v3"]
    stored = EmbeddingSet.open(v3_sets / "gallery_v1@v3").read()
    expected = index_for_set(EmbeddingSet.open(v3_sets / "gallery_v1@v3")).search(stored.embeddings[5][None], 3)
    forms = [f"fct-backbone/{v3.version}", str(v3.version), str(v3.ref), f"v3@{v3.ref.sha256}", "v3", "@champion"]
    for form in forms:
        response = client.post("/search", json={"embedding": stored.embeddings[5].tolist(), "k": 3, "model": form})
        assert response.status_code == 200, (form, response.text)
        assert response.json()["query_model"] == "matched" and response.json()["ids"] == expected.ids[0].tolist()


def test_embedding_of_another_version_is_refused_with_409_naming_both(client, world):
    """The issue's case: a vector of another version, even one of the served dim, gets 409, not neighbours."""
    v1, v2, v3 = (world.versions[key] for key in ("v1", "v2", "v3"))
    pixels = world.zoo.splits["test"].images[:1]
    v2_embedding = embed_images(OnnxModel(world.zoo.dirs["v2"] / "model.onnx"), pixels)[0].tolist()  # 16-d
    cases = [(v2_embedding, "v2", v2), (v2_embedding, f"fct-backbone/{v2.version}", v2),
             (EMBEDDING, str(v1.ref), v1), (EMBEDDING, str(v1.version), v1)]  # EMBEDDING has v3's dim
    for embedding, model, claimed in cases:
        response = client.post("/search", json={"embedding": embedding, "model": model})
        assert response.status_code == 409, (model, response.text)
        assert one_line_detail(response) == (
            f"query embedding is from {claimed} ({model!r}) but this service serves {v3}; embed the query with "
            f"fct-backbone/{v3.version} or upload the image")


EMBEDDING = [0.5] * factories.DIMS["v3"]
NOISE = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
BAD_REQUESTS = {
    "not an image": ({"files": {"image": ("q.png", b"plain text, not pixels", "image/png")}}, 422, "not a PNG or JPEG"),
    "truncated png": ({"files": {"image": ("q.png", png(NOISE)[:len(png(NOISE)) // 2], "image/png")}}, 422,
                      "cannot be decoded as an image: image file is truncated"),
    "too many pixels": ({"files": {"image": ("q.png", png(np.zeros((4096, 4097), np.uint8)), "image/png")}}, 422,
                        "image is 4097x4096 pixels; at most 16777216"),
    "too large": ({"files": {"image": ("q.png", b"\0" * (MAX_UPLOAD + 1), "image/png")}}, 413, "exceeds 65536 bytes"),
    "other file field": ({"files": {"picture": ("q.png", b"x", "image/png")}}, 422, "field 'picture' is not accepted"),
    "no image": ({"files": {"k": (None, "3")}}, 422, "field 'image' must be a PNG or JPEG file upload"),
    "wrong dim": ({"json": {"embedding": EMBEDDING[:-1]}}, 422,
                  "embedding has 11 values; expected 12, the embedding dim of the served fct-backbone/"),
    "too large for float32": ({"json": {"embedding": [1e39] + EMBEDDING[1:]}}, 422, "embedding.0: 1e+39 overflows"),
    "norm overflows": ({"json": {"embedding": [3e38] * 12}}, 422, "squared norm 1.08e+78 is out of float32's range"),
    "distances overflow": ({"json": {"embedding": [1.8e19] + [0.0] * 11}}, 422, "l2 scores are out of float32's"),
    "unknown model": ({"json": {"embedding": EMBEDDING, "model": "v9"}}, 422,
                      "query model 'v9' is not a registered fct-backbone version (known: 1 (v1@"),
    "side-info model": ({"json": {"embedding": EMBEDDING, "model": "fct-side-info/1"}}, 422,
                        "'fct-side-info/1' is not a fct-backbone version"),
    "unknown alias": ({"json": {"embedding": EMBEDDING, "model": "@nobody"}}, 422, "query model '@nobody': alias"),
    "empty model": ({"json": {"embedding": EMBEDDING, "model": ""}}, 422, "model: String should have at least 1"),
    "multi-line field name": ({"json": {"embedding": EMBEDDING, "a\nb": 1}}, 422, "a b: Extra inputs"),
    "model in a form": ({"files": {"image": ("q.png", png(NOISE), "image/png")}, "data": {"model": "v3"}}, 422,
                        "multipart field 'model' is not accepted"),
    "two form fields": ({"files": {"image": ("q.png", png(NOISE), "image/png")}, "data": {"k": "2", "x": "1"}}, 400,
                        "Too many fields"),
    "nan": ({"content": b'{"embedding": [NaN' + b", 0.5" * 11 + b"]}", "headers": {"content-type": "application/json"}},
            422, "embedding.0: Input should be a finite number"),
    "boolean values": ({"json": {"embedding": [True] * 12}}, 422, "embedding.0: Input should be a valid number"),
    "k as a string": ({"json": {"embedding": EMBEDDING, "k": "5"}}, 422, "k: Input should be a valid integer"),
    "empty embedding": ({"json": {"embedding": []}}, 422, "embedding: List should have at least 1 item"),
    "k zero": ({"json": {"embedding": EMBEDDING, "k": 0}}, 422,
               "k must be in [1, 50] (max_k 100, gallery size 50), got 0"),
    "k negative param": ({"json": {"embedding": EMBEDDING}, "params": {"k": -3}}, 422, "got -3"),
    "k above max_k": ({"json": {"embedding": EMBEDDING, "k": MAX_K + 1}}, 422, "got 101"),
    "k above gallery": ({"json": {"embedding": EMBEDDING, "k": 51}}, 422, "gallery size 50), got 51"),
    "overridden k param": ({"json": {"embedding": EMBEDDING, "k": 5}, "params": {"k": 0}}, 422, "got 0"),
    "k not int": ({"json": {"embedding": EMBEDDING}, "params": {"k": "ten"}}, 422, "query.k: Input should be"),
    "form k not int": ({"files": {"image": ("q.png", png(np.zeros((28, 28), np.uint8)), "image/png")},
                        "data": {"k": "1.5"}}, 422, "k: Input should be"),
    "invalid json": ({"content": b"{", "headers": {"content-type": "application/json"}}, 422, "Invalid JSON"),
    "unknown json field": ({"json": {"embedding": EMBEDDING, "kk": 3}}, 422, "kk: Extra inputs"),
    "plain text": ({"content": b"0.5 0.5", "headers": {"content-type": "text/plain"}}, 415, "'text/plain'"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_a_one_line_4xx_and_the_service_keeps_serving(client, case):
    request, status, reason = BAD_REQUESTS[case]
    response = client.post("/search", **request)
    assert response.status_code == status, response.text
    assert reason in one_line_detail(response)
    assert client.get("/health").status_code == 200
    assert client.post("/search", json={"embedding": EMBEDDING, "k": 2}).status_code == 200


def test_refuses_to_start_without_a_gallery_of_the_champion(world, tmp_path):
    """The shared world's sets hold only the v1 gallery while champion is v3: no app, no bound port, CLI exit 1."""
    expected = r"cannot serve @champion fct-backbone/\d+ \(v3@.*sets: gallery_v1 \(v1@"
    with pytest.raises(VersionMismatchError, match=expected):
        create_app(world.registry, world.sets_root)
    with pytest.raises(VersionMismatchError, match=expected):
        serve(world.registry, world.sets_root, port=0)
    result = CliRunner().invoke(cli.app, ["--root", str(world.root), "serve", "--port", "0"])
    assert result.exit_code == 1 and "error: cannot serve @champion" in result.output


class Answer(NamedTuple):
    """One answered query of the hot-swap test: the model that served it, whether its ids equal a direct search
    with that model's pair, and when it was sent and answered (``time.monotonic()``)."""

    model: str
    as_expected: bool
    sent: float
    answered: float


def embedding_length(http: httpx.Client) -> int:
    """The length ``/openapi.json`` requires of ``/search``'s JSON embedding (its minItems, = its maxItems)."""
    body = http.get("/openapi.json").json()["paths"]["/search"]["post"]["requestBody"]["content"]
    items = body["application/json"]["schema"]["properties"]["embedding"]
    assert items["minItems"] == items["maxItems"]
    return items["minItems"]


def test_hot_swap_after_promote_loses_no_request_and_serves_the_new_pair(tmp_path_factory):
    world = factories.fresh_world(tmp_path_factory)  # this test moves the champion alias
    registry, sets_root = world.registry, world.sets_root
    v3_set = upgraded_to_v3(world, sets_root)
    registry.set_alias("backbone", "champion", "v1")
    images = world.zoo.splits["test"].images[[0, 11, 23, 36, 49]]
    k = 5
    expected = {str(world.versions[key].ref): [direct(world.zoo.dirs[key], path, image[None], k).ids[0].tolist()
                                                for image in images]
                for key, path in (("v1", world.gallery), ("v3", v3_set))}
    uploads = [png(image[0]) for image in images]
    answers: list[Answer] = []
    failures: list[str] = []
    stop = threading.Event()

    def query_loop(url: str, offset: int) -> None:
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(offset, offset + 400):  # bounded in count and time
                if stop.is_set() or time.monotonic() > deadline:
                    return
                j = i % len(uploads)
                sent = time.monotonic()
                try:
                    response = http.post("/search", files={"image": ("q.png", uploads[j], "image/png")},
                                         params={"k": k})
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text}")
                    continue
                body = response.json()
                answers.append(Answer(body["model"], body["ids"] == expected[body["model"]][j], sent, time.monotonic()))

    def wait_for(n: int, model: str) -> None:
        deadline = time.monotonic() + 20
        while sum(a.model == model for a in answers) < n and not failures and time.monotonic() < deadline:
            time.sleep(0.01)

    with running(create_app(registry, sets_root)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/info").json()["backbone"]["label"] == "v1"
        assert embedding_length(http) == factories.DIMS["v1"]
        clients = [threading.Thread(target=query_loop, args=(url, n)) for n in range(3)]
        for thread in clients:
            thread.start()
        v1, v3 = (str(world.versions[key].ref) for key in ("v1", "v3"))
        wait_for(20, v1)
        promote.promote(registry, "v3", sets_root)  # every set can follow v3; the alias moves
        reload_sent = time.monotonic()
        reloaded = http.post("/reload")
        reload_answered = time.monotonic()
        wait_for(20, v3)
        stop.set()
        for thread in clients:
            thread.join(30)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["gallery"]["path"] == str(v3_set)
        assert failures == []
        assert any(a.sent < reload_answered and a.answered > reload_sent for a in answers)  # overlapped the swap
        served = [a.model for a in answers]
        assert served.count(v1) >= 20 and served.count(v3) >= 20 and set(served) == {v1, v3}
        assert all(a.as_expected for a in answers), "a response mixed one pair's model with another's gallery"
        info = http.get("/info").json()
        assert (info["backbone"]["label"], info["gallery"]["model"]) == ("v3", v3)
        assert embedding_length(http) == factories.DIMS["v3"]  # the OpenAPI schema follows the served pair
        stale = http.post("/search", json={"embedding": [0.5] * factories.DIMS["v3"], "model": v1})
        assert stale.status_code == 409 and f"but this service serves {world.versions['v3']}" in stale.json()["detail"]

        registry.set_alias("backbone", "champion", "v2")  # no v2 gallery: the reload is refused
        refused = http.post("/reload")
        assert refused.status_code == 409 and "still serving fct-backbone" in refused.json()["detail"]
        assert http.get("/info").json()["backbone"]["label"] == "v3"
        assert http.post("/search", files={"image": ("q.png", uploads[0], "image/png")}, params={"k": k}).json()[
            "ids"] == expected[v3][0]
