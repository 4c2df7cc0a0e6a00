"""`mathwizard ask`: streamed and JSON answers from the tiny model (base and a stage's adapter), and its errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mathwizard.ask import Tutor, load_image
from mathwizard.cli import app
from mathwizard.errors import DataError

runner = CliRunner()
QUESTION = "In triangle ABC, AB = AC and angle B = 50 degrees. Find angle A."


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def figure(tmp_path: Path) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (80, 60), "white")
    ImageDraw.Draw(image).polygon([(10, 50), (70, 50), (40, 5)], outline="black")
    path = tmp_path / "triangle.png"
    image.save(path)
    return path


@pytest.fixture(scope="module")
def sft_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 03-sft-like folder whose adapter/ holds a LoRA adapter on the tiny model, saved as the SFT stage saves it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mathwizard.models import load_model, write_adapter_pointer

    stage = tmp_path_factory.mktemp("run") / "03-sft"
    base, processor = load_model("tiny", "hf", for_training=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero, so the adapter really changes the answers
                torch.nn.init.normal_(param, std=0.5)
    adapter = stage / "adapter"
    model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    write_adapter_pointer(adapter, "tiny", "hf")
    return stage


def test_ask_streams_the_answer_then_prints_the_final_answer(figure: Path) -> None:
    result = runner.invoke(app, ["ask", "--model", "tiny", "--image", str(figure), QUESTION, "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.rstrip("\n").split("\n")
    # A random tiny model gives no boxed answer, and the command says so instead of inventing one.
    assert lines[-1] == "Final answer: (none: the reply has no \\boxed{} answer)"
    streamed = "\n".join(lines[:-1]).strip()
    tutor = Tutor.load("tiny")
    expected = tutor.ask(QUESTION, load_image(figure), max_new_tokens=12)
    assert streamed == expected.answer  # greedy: what streamed is the whole answer


def test_ask_json_is_one_object(figure: Path) -> None:
    args = ["ask", "--model", "tiny", "--image", str(figure), QUESTION, "--json", "--max-new-tokens", "10"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert set(answer) == {"answer", "final_answer", "model", "tokens"}
    assert answer["model"] == "tiny" and answer["final_answer"] is None and 1 <= answer["tokens"] <= 10


def test_ask_answers_from_a_stage_folder(figure: Path, sft_stage: Path) -> None:
    args = ["ask", "--image", str(figure), QUESTION, "--json", "--max-new-tokens", "10"]
    from_stage = json.loads(runner.invoke(app, [*args, "--model", str(sft_stage)]).stdout)
    from_adapter = json.loads(runner.invoke(app, [*args, "--model", str(sft_stage / "adapter")]).stdout)
    base = json.loads(runner.invoke(app, [*args, "--model", "tiny"]).stdout)
    assert from_stage["answer"] == from_adapter["answer"]  # the stage folder means its adapter/
    assert from_stage["answer"] != base["answer"]  # the adapter is really applied


def test_library_streams_pieces_of_the_same_answer(figure: Path) -> None:
    tutor = Tutor.load("tiny")
    pieces: list[str] = []
    streamed = tutor.ask(QUESTION, load_image(figure), max_new_tokens=12, on_text=pieces.append)
    assert len(pieces) >= 1 and "".join(pieces).strip() == streamed.answer
    with pytest.raises(DataError, match="question is empty"):
        tutor.ask("  ", load_image(figure))


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    return " ".join(result.output.split())


def test_missing_image(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ask", "--model", "tiny", "--image", str(tmp_path / "nope.png"), QUESTION])
    assert f"image {tmp_path / 'nope.png'} does not exist" in _one_error_line(result)


@pytest.mark.parametrize("content", ["text", "truncated", "folder"])
def test_unreadable_image(tmp_path: Path, figure: Path, content: str) -> None:
    path = tmp_path / "bad.png"
    if content == "text":
        path.write_text("not an image")
    elif content == "truncated":
        path.write_bytes(figure.read_bytes()[:60])  # a valid PNG header, then nothing
    else:
        path.mkdir()
    message = _one_error_line(runner.invoke(app, ["ask", "--model", "tiny", "--image", str(path), QUESTION]))
    expected = "is not a file" if content == "folder" else "is not a readable image"
    assert f"image {path} {expected}" in message


def test_missing_model(tmp_path: Path, figure: Path) -> None:
    missing = tmp_path / "runs" / "default" / "05-dpo"
    result = runner.invoke(app, ["ask", "--model", str(missing), "--image", str(figure), QUESTION])
    assert f"{missing} does not exist" in _one_error_line(result)
    # Without --model, the run's DPO folder is the default; in an empty home it is missing too.
    default = runner.invoke(app, ["ask", "--home", str(tmp_path), "--image", str(figure), QUESTION])
    assert "05-dpo does not exist" in _one_error_line(default)


def test_load_image_gives_rgb(tmp_path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (5, 5), 128).save(buffer, format="JPEG")
    (tmp_path / "g.jpg").write_bytes(buffer.getvalue())
    assert load_image(tmp_path / "g.jpg").mode == "RGB"


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims `width` x `height` pixels in its header and holds almost nothing (a decompression bomb)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)))
    return path


@pytest.mark.parametrize(
    ("size", "shown"),
    [((20000, 20000), ""), ((9000, 9000), ": 9,000 x 9,000")],  # PIL refuses the first at open, we the second
    ids=["bomb", "over-the-limit"],
)
def test_an_image_with_too_many_pixels_is_one_line(tmp_path: Path, size: tuple[int, int], shown: str) -> None:
    path = _png_header(tmp_path / "big.png", *size)
    message = _one_error_line(runner.invoke(app, ["ask", "--model", "tiny", "--image", str(path), QUESTION]))
    assert message == (
        f"error: image {path} has more than 64,000,000 pixels{shown} (prepare.max_image_pixels); pass a figure of"
        " ordinary size"
    )


def test_the_pixel_limit_is_the_prepare_setting(figure: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHWIZARD_PREPARE__MAX_IMAGE_PIXELS", "4000")  # the 80 x 60 figure has 4,800
    message = _one_error_line(runner.invoke(app, ["ask", "--model", "tiny", "--image", str(figure), QUESTION]))
    assert "has more than 4,000 pixels: 80 x 60 (prepare.max_image_pixels)" in message
    with pytest.raises(DataError, match="more than 4,799 pixels"):
        load_image(figure, max_pixels=4799)
    assert load_image(figure, max_pixels=4800).size == (80, 60)
