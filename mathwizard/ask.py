"""Ask the tutor one question about one figure: the library behind `mathwizard ask` (it replaces the notebooks).

Usage: `mathwizard ask --model <run>/05-dpo --image figure.png "Find angle ABC."`

Any stage's model works: a stage folder (03-sft, 05-dpo) or its `adapter/`, a model dir, 'tiny' or a Hub id, on
either backend. The answer streams through a callback as it is generated; the final boxed answer comes separately.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mathwizard.answers import final_answer
from mathwizard.config import PrepareConfig
from mathwizard.errors import DataError
from mathwizard.generation import ModelGenerator, Request, SamplingParams, load_generator
from mathwizard.prompts import load_prompt

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 1024
# The same guard as prepare's (prepare.max_image_pixels): a figure is never a 400-megapixel decompression bomb.
DEFAULT_MAX_PIXELS: int = PrepareConfig.model_fields["max_image_pixels"].default


@dataclass(frozen=True)
class Answer:
    """The tutor's reply: the full text, its final boxed answer (None when it gave none), and what produced it."""

    answer: str
    final_answer: str | None
    model: str
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """The figure as an RGB PIL image, fully decoded now so a corrupt file fails here, not mid-generation.

    The size is checked from the header before anything is decoded, so a decompression bomb costs nothing.

    Raises:
        DataError: the file is missing, is a folder, is not a readable image, or has more than `max_pixels` pixels.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise DataError(f"image {path} does not exist; pass --image with the path of the figure")
    if not path.is_file():
        raise DataError(f"image {path} is not a file; pass --image with the path of the figure")

    def too_big(size: str = "") -> DataError:
        return DataError(
            f"image {path} has more than {max_pixels:,} pixels{size} (prepare.max_image_pixels); pass a figure of"
            " ordinary size"
        )

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL refuses to open more than twice this; we refuse more than once, below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise too_big(f": {width:,} x {height:,}")
                image.load()
                return image.convert("RGB")
    except Image.DecompressionBombError:  # PIL's own guard, at twice the limit: the size is in its message only
        raise too_big() from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"image {path} is not a readable image ({reason}); pass a PNG or JPEG file") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


class Tutor:
    """A loaded model answering questions about figures with the tutor's instruction (the one it was trained on)."""

    def __init__(self, generator: ModelGenerator, name: str) -> None:
        self.generator = generator
        self.name = name
        self.system = load_prompt("tutor_system")

    @classmethod
    def load(
        cls, model: str | Path, *, backend: str = "auto", dtype: str = "auto", load_in_4bit: bool = False
    ) -> Tutor:
        """Load `model` for answering.

        Raises:
            ModelError: the model is missing (a path that does not exist, a Hub id not in the local cache when
                offline) or cannot be loaded on this machine.
        """
        generator = load_generator(model, backend=backend, dtype=dtype, load_in_4bit=load_in_4bit, batch_size=1)
        return cls(generator, str(model))

    def ask(
        self,
        question: str,
        image: Any,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer greedily; `on_text` receives the answer piece by piece while it is generated."""
        if not question.strip():
            raise DataError("the question is empty; pass the question as the command's argument")
        request = Request(text=question, image=image, system=self.system)
        params = SamplingParams(max_new_tokens=max_new_tokens)
        if on_text is None:
            (completion,) = self.generator([request], params)
        else:
            completion = self.generator.stream(request, params, on_text)
        return Answer(
            answer=completion.text,
            final_answer=final_answer(completion.text),
            model=self.name,
            tokens=completion.tokens,
        )


def ask(
    model: str | Path,
    image_path: str | Path,
    question: str,
    *,
    backend: str = "auto",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    on_text: Callable[[str], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Answer:
    """Load `model`, read the figure and answer `question` (the image is checked before the model is loaded).

    Raises:
        DataError: the image is missing, unreadable or over `max_pixels`, or the question is empty.
        ModelError: the model is missing or cannot be loaded.
    """
    image = load_image(image_path, max_pixels)
    if not question.strip():
        raise DataError("the question is empty; pass the question as the command's argument")
    tutor = Tutor.load(model, backend=backend)
    return tutor.ask(question, image, max_new_tokens=max_new_tokens, on_text=on_text)
