"""Validate every MM_Math row and figure; rows that fail go to a quarantine file with a reason, never silently.

Images are decoded safely (decompression-bomb guard before decoding, truncated and corrupt files caught),
converted to RGB from any PIL mode, shrunk to `max_size` on the longest side and re-encoded as PNG. That work
dominates the stage, so it runs in worker processes; the result does not depend on the number of workers.
Decoding always happens in a child process, even with one worker: a C-level crash of a decoder (a segfault)
then kills only that process, and its figure is quarantined as `decoder_crashed` instead of ending the stage.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("question", "file_name", "solution", "year", "difficult", "knowledge")
# Older revisions of MM_Math (MM_Math.json + image.tar) named the figure field differently.
LEGACY_FIELDS = (("image_file_name", "file_name"), ("image", "file_name"))
_SERIAL_BELOW = 16  # more than one worker process costs more than it saves for a handful of images
_QUEUED = 2  # figures sent to a worker ahead of its answers: one being cleaned, one waiting, so it never idles
_AHEAD = 256  # figures handed out past the oldest unanswered one: bounds the results held back for ordering
# TEST-ONLY fault injection, inert unless set: comma-separated figure names (basenames) on which the image worker
# kills itself with SIGSEGV (`name:exit` -> os._exit(139)), standing in for a C-level crash of Pillow.
TEST_CRASH_ENV = "MATHWIZARD_TEST_CRASH_IMAGES"


class Reason(StrEnum):
    """Quarantine reason codes (stable: they are counted in manifests and dashboards)."""

    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    BLANK_FIELD = "blank_field"
    TOO_LONG = "too_long"  # the question or solution is longer than prepare's limit (a broken row, not a problem)
    DUPLICATE = "duplicate"
    DUPLICATE_ID = "duplicate_id"
    UNSAFE_PATH = "unsafe_path"
    MISSING_IMAGE = "missing_image"
    IMAGE_CORRUPT = "image_corrupt"
    IMAGE_TRUNCATED = "image_truncated"
    IMAGE_TOO_LARGE = "image_too_large"
    DECODER_CRASHED = "decoder_crashed"  # the figure killed two cleaning processes in a row (e.g. a segfault)


@dataclass(frozen=True)
class Rejection:
    """One quarantined row: where it was in the input, which figure, and why."""

    line: int
    file_name: str | None
    reason: Reason
    detail: str = ""

    def to_json(self) -> str:
        record = asdict(self)
        record["reason"] = str(self.reason)
        return json.dumps(record, ensure_ascii=False)


class RowError(Exception):
    """A row or image failed validation; carries the quarantine reason."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------- records
def read_records(path: Path, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any] | Rejection]]:
    """(line number, row or rejection) for every record of a jsonl file or a json list.

    Blank lines are skipped (they are not rows). For a json list, `line` is the 1-based record index.
    A json file that does not parse at all is a DataError: there are no rows to quarantine.
    """
    from mathwizard.errors import DataError

    count = 0
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); expected a list of MM_Math rows") from None
        if isinstance(data, dict):  # {"data": [...]} or {"rows": [...]}
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise DataError(f"{path} holds no list of rows; expected a JSON list of MM_Math rows")
        for index, item in enumerate(data, start=1):
            if limit is not None and count >= limit:
                return
            count += 1
            if isinstance(item, dict):
                yield index, item
            else:
                yield index, Rejection(index, None, Reason.NOT_AN_OBJECT, type(item).__name__)
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            try:
                item = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield number, Rejection(number, None, Reason.MALFORMED_JSON, "not UTF-8")
                continue
            except ValueError as exc:
                yield number, Rejection(number, None, Reason.MALFORMED_JSON, str(exc)[:120])
                continue
            if not isinstance(item, dict):
                yield number, Rejection(number, None, Reason.NOT_AN_OBJECT, type(item).__name__)
                continue
            yield number, item


def _as_text(value: Any) -> str | None:
    """Field values as text: numbers (a grade given as 8) and lists of strings (knowledge points) are accepted."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "; ".join(v.strip() for v in value)
    return None


def normalize_row(raw: dict[str, Any]) -> dict[str, str]:
    """The six MM_Math fields as stripped strings, legacy names mapped; raises RowError for a missing/blank one."""
    row = dict(raw)
    for old, new in LEGACY_FIELDS:
        if new not in row and isinstance(row.get(old), str):
            row[new] = row[old]
    out: dict[str, str] = {}
    for name in REQUIRED_FIELDS:
        if name not in row or row[name] is None:
            raise RowError(Reason.MISSING_FIELD, name)
        text = _as_text(row[name])
        if text is None:
            raise RowError(Reason.MISSING_FIELD, f"{name} is a {type(row[name]).__name__}, not text")
        if not text.strip():
            raise RowError(Reason.BLANK_FIELD, name)
        # Keep LaTeX exactly (inner whitespace can matter); only trim the ends.
        out[name] = text.strip()
    return out


def check_lengths(row: dict[str, str], max_question_chars: int | None, max_solution_chars: int | None) -> None:
    """Raise RowError(too_long) for a question or solution over its limit (None: no limit), in characters."""
    for name, limit in (("question", max_question_chars), ("solution", max_solution_chars)):
        if limit is not None and len(row[name]) > limit:
            raise RowError(Reason.TOO_LONG, f"{name} is {len(row[name]):,} characters, over the limit of {limit:,}")


def resolve_image(root: Path, file_name: str) -> Path:
    """The figure's path inside `root`; raises RowError when the name could reach outside it or is missing.

    Rejected: absolute paths, drive letters, `..`, NUL bytes, and any link along the way (a link could point
    anywhere, and a later swap of its target would change the data behind the fingerprint).
    """
    name = file_name.replace("\\", "/")
    pure = PurePosixPath(name)
    if "\x00" in name or pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise RowError(Reason.UNSAFE_PATH, "absolute path")
    if ".." in pure.parts:
        raise RowError(Reason.UNSAFE_PATH, "'..' in path")
    current = root
    for part in pure.parts:
        current = current / part
        try:
            mode = current.lstat().st_mode
        except FileNotFoundError:
            raise RowError(Reason.MISSING_IMAGE, "no such file") from None
        except OSError as exc:
            raise RowError(Reason.MISSING_IMAGE, exc.strerror or type(exc).__name__) from None
        if (mode & 0o170000) == 0o120000:  # S_IFLNK
            raise RowError(Reason.UNSAFE_PATH, "symbolic link")
    if not current.is_file():
        raise RowError(Reason.MISSING_IMAGE, "not a regular file")
    if not current.resolve().is_relative_to(root.resolve()):
        raise RowError(Reason.UNSAFE_PATH, "resolves outside the image folder")
    return current


# ------------------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class ImageResult:
    """What the image worker returns: PNG bytes, or the reason the figure was rejected."""

    png: bytes | None
    reason: Reason | None = None
    detail: str = ""
    original_size: tuple[int, int] = (0, 0)
    size: tuple[int, int] = (0, 0)


def to_rgb(img: Any) -> Any:
    """Any PIL mode to RGB: transparency over white, 16/32-bit and float greys scaled to 8 bits, CMYK converted."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I") or img.mode == "F":
        import numpy as np

        values = np.asarray(img, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if img.mode.startswith("I;16") or (low >= 0 and 255 < high <= 65535):
            values = values / 257.0  # 16-bit range to 8 bits
        elif low < 0 or high > 255:
            values = (values - low) * (255.0 / (high - low or 1.0))  # unknown range: stretch
        return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def clean_image(path: str, max_size: int, max_pixels: int) -> ImageResult:
    """Decode, check, convert and shrink one figure; never raises for a bad file (it returns the reason)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL refuses to even open > 2x this; we reject > 1x below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    return ImageResult(None, Reason.IMAGE_TOO_LARGE, f"{width}x{height} pixels > {max_pixels}")
                if img.format == "JPEG" and max(width, height) > max_size:
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target): much faster.
                    scale = max_size / max(width, height)
                    img.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = to_rgb(img)
                if max(rgb.size) > max_size:
                    scale = max_size / max(rgb.size)
                    target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
                    rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
                buffer = io.BytesIO()
                rgb.save(buffer, format="PNG")
                return ImageResult(buffer.getvalue(), original_size=(width, height), size=rgb.size)
    except Image.DecompressionBombError as exc:
        return ImageResult(None, Reason.IMAGE_TOO_LARGE, str(exc)[:120])
    except UnidentifiedImageError:
        return ImageResult(None, Reason.IMAGE_CORRUPT, "not a recognised image format")
    except OSError as exc:
        if "truncated" in str(exc).lower():
            return ImageResult(None, Reason.IMAGE_TRUNCATED, str(exc)[:120])
        return ImageResult(None, Reason.IMAGE_CORRUPT, str(exc)[:120] or type(exc).__name__)
    except (ValueError, SyntaxError, TypeError, IndexError, KeyError, MemoryError, EOFError) as exc:
        # PIL's decoders raise these for malformed headers and chunks.
        return ImageResult(None, Reason.IMAGE_CORRUPT, f"{type(exc).__name__}: {str(exc)[:100]}")
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def default_workers() -> int:
    return os.cpu_count() or 1


def _pool_context() -> multiprocessing.context.BaseContext:
    # forkserver: children start from a clean server process, never from a parent that runs Prefect's
    # threads (forking those can deadlock); spawn where forkserver does not exist.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# ------------------------------------------------------------------------------------------ workers
@contextmanager
def _main_without_missing_file() -> Iterator[None]:
    """Hide a main script that is not a file (`python - <<EOF`: '<stdin>') while a worker starts.

    forkserver and spawn children re-run the parent's main script by its path before they can work; a path that
    does not exist kills every child at start. A main without `__file__` (a notebook, `python -c`) is skipped.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None or os.path.isfile(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def _test_crash_targets() -> dict[str, str]:
    """TEST-ONLY: figure name -> how its worker dies ("segv" or "exit"), from `TEST_CRASH_ENV`; {} when unset.

    Read in the parent when cleaning starts and handed to the workers as an argument, because forkserver children
    inherit the server's environment, not the current one.
    """
    targets: dict[str, str] = {}
    for item in os.environ.get(TEST_CRASH_ENV, "").split(","):
        name, _, how = item.strip().partition(":")
        if name:
            targets[name] = how or "segv"
    return targets


def _test_crash_hook(path: str, targets: dict[str, str]) -> None:
    """TEST-ONLY fault injection: die the way a segfaulting decoder would, on the figures a test named."""
    how = targets.get(os.path.basename(path))
    if how is None:
        return
    with suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file for a crash made on purpose
    if how == "exit":
        os._exit(139)
    os.kill(os.getpid(), signal.SIGSEGV)


@dataclass(frozen=True)
class _Failure:
    """A Python exception in a worker: a bug, not a bad figure, so the parent re-raises it (as a pool would)."""

    error: BaseException
    trace: str


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


_READY = "ready"


def _worker_main(conn: Connection, crash_targets: dict[str, str]) -> None:
    """One cleaning process: answer each (index, job) from `conn` with (index, result), in order, until None/EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops its workers
    conn.send(_READY)  # a process that dies before this is a broken setup, not a bad figure
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message is None:
            return
        index, (path, max_size, max_pixels) = message
        if crash_targets:
            _test_crash_hook(path, crash_targets)
        try:
            answer: ImageResult | _Failure = clean_image(path, max_size, max_pixels)
        except Exception as exc:
            answer = _Failure(_picklable(exc), traceback.format_exc())
        conn.send((index, answer))


def _death_cause(exitcode: int | None) -> str:
    """How a worker process ended, in words: 'signal SIGSEGV' or 'exit code 139'."""
    if exitcode is None:
        return "no exit status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class _Worker:
    """A cleaning process and the rows sent to it, oldest first (it answers them in that order)."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, crash_targets: dict[str, str]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, crash_targets), name="mathwizard-clean-image", daemon=True
        )
        with _main_without_missing_file():
            self.process.start()
        child.close()  # else our own copy keeps the pipe open and a dead worker never reads as EOF
        self.ready = False
        self.rows: list[int] = []

    def send(self, index: int, job: tuple[str, int, int]) -> None:
        self.rows.append(index)
        with suppress(OSError):  # already dead: the EOF on the next read reports it with the row still listed
            self.conn.send((index, job))

    def reap(self) -> str:
        """Wait for the dead process and say how it died."""
        self.process.join(10)
        if self.process.is_alive():  # closed its pipe but lingers: finish it
            self.process.kill()
            self.process.join()
        self.conn.close()
        return _death_cause(self.process.exitcode)


def _stop(workers: list[_Worker]) -> None:
    for worker in workers:
        with suppress(OSError):
            worker.conn.send(None)
    for worker in workers:
        worker.process.join(2)
        if worker.process.is_alive():  # busy on a row nobody will read (the caller stopped early)
            worker.process.kill()
            worker.process.join()
        worker.conn.close()


def _clean_in_workers(jobs: Sequence[tuple[str, int, int]], workers: int) -> Iterator[ImageResult]:
    """Results of `jobs`, in order, from `workers` processes that each clean one figure at a time.

    When a process dies (a C-level crash in a decoder), only the figure it was cleaning is suspect: the figures
    queued behind it go to the other workers, and the suspect is tried once more, alone, in a fresh process, so a
    worker killed for an unrelated reason costs no row. A figure that kills that process too is quarantined as
    `decoder_crashed`. Which process cleans which figure never changes a result, so the output is deterministic.

    Raises:
        RuntimeError: a worker process died before it could start (a broken environment, not a bad figure).
    """
    from heapq import heapify, heappop, heappush
    from multiprocessing.connection import wait

    ctx = _pool_context()
    crash_targets = _test_crash_targets()
    todo = list(range(len(jobs)))  # a heap: re-queued rows go first, so output never waits on the far end
    heapify(todo)
    suspects: set[int] = set()  # rows whose worker died once
    done: dict[int, ImageResult] = {}
    position = 0  # the next row to yield
    pool = [_Worker(ctx, crash_targets) for _ in range(min(workers, len(jobs)))]
    try:
        while position < len(jobs):
            # -- hand out rows: a few per worker, none to one retrying a suspect (it must run alone)
            for worker in pool:
                while todo and len(worker.rows) < _QUEUED and todo[0] < position + _AHEAD:
                    if worker.rows and worker.rows[0] in suspects:
                        break
                    index = heappop(todo)
                    worker.send(index, jobs[index])
            # -- collect answers, replacing any worker that died
            busy = {worker.conn: worker for worker in pool if worker.rows}
            if not busy:  # cannot happen: every row not yet yielded is queued, in a worker or done
                raise RuntimeError(f"image cleaning stalled at row {position} of {len(jobs)} with nothing in flight")
            for conn in wait(list(busy)):
                worker = busy[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    cause = worker.reap()
                    if not worker.ready:
                        raise RuntimeError(
                            f"an image-cleaning process died before it started ({cause}); "
                            "its own error, if any, is on stderr above"
                        ) from None
                    culprit, *queued = worker.rows
                    for index in queued:  # never started: another worker takes them
                        heappush(todo, index)
                    replacement = _Worker(ctx, crash_targets)
                    pool[pool.index(worker)] = replacement
                    if culprit in suspects:
                        detail = f"image decoder crashed (worker died: {cause})"
                        log.warning(
                            "quarantined %s: it killed a second, fresh image worker (%s)", jobs[culprit][0], cause
                        )
                        done[culprit] = ImageResult(None, Reason.DECODER_CRASHED, detail)
                    else:
                        log.warning("an image worker died (%s) on %s; retrying it alone", cause, jobs[culprit][0])
                        suspects.add(culprit)
                        replacement.send(culprit, jobs[culprit])
                    continue
                if message == _READY:
                    worker.ready = True
                    continue
                index, answer = message
                worker.rows.remove(index)
                if isinstance(answer, _Failure):
                    raise answer.error from RuntimeError(f"in an image worker, on {jobs[index][0]}:\n{answer.trace}")
                done[index] = answer
            # -- hand the finished prefix on, in input order
            while position in done:
                yield done.pop(position)
                position += 1
    finally:
        _stop(pool)


def clean_images(
    paths: Sequence[str], max_size: int, max_pixels: int, workers: int | None = None
) -> Iterator[ImageResult]:
    """Results for `paths`, in order, from `workers` child processes (default: every core).

    Even one worker is a child process, so a figure that crashes the decoder is quarantined instead of killing
    the caller; `clean_images_serial` is the in-process loop, without that protection.
    """
    workers = workers or default_workers()
    if not paths:
        return
    jobs = [(p, max_size, max_pixels) for p in paths]
    yield from _clean_in_workers(jobs, 1 if len(jobs) < _SERIAL_BELOW else workers)


def clean_images_serial(paths: Iterable[str], max_size: int, max_pixels: int) -> list[ImageResult]:
    """The original approach: one image after another in this process (the benchmark's baseline).

    A decoder crash here kills the caller; the stage uses `clean_images`, which isolates it.
    """
    return [clean_image(p, max_size, max_pixels) for p in paths]


# ------------------------------------------------------------------------------------------ dataset
@dataclass
class CleanReport:
    """Counts of one cleaning pass (they go to the manifest)."""

    rows_in: int = 0
    kept: int = 0
    resized: int = 0
    by_reason: dict[str, int] | None = None

    @property
    def quarantined(self) -> int:
        return sum((self.by_reason or {}).values())


def clean_dataset(
    records: Path,
    images: Path,
    out_parquet: Path,
    quarantine: Path,
    *,
    salt: str,
    max_size: int,
    max_pixels: int,
    limit: int | None = None,
    workers: int | None = None,
    batch_rows: int = 128,
    max_question_chars: int | None = None,
    max_solution_chars: int | None = None,
) -> CleanReport:
    """Validate every row of `records` against the figures in `images`; write the kept rows and the rejections.

    Kept rows go to `out_parquet` (the prepared columns, figures as PNG bytes) in input order, written in
    batches so memory stays flat on the full dataset; rejected rows go to `quarantine` (jsonl, by line). A question
    or solution over its character limit (None: no limit) is rejected as `too_long`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mathwizard.data.splits import arrow_schema, row_id

    report = CleanReport()
    rejected: list[Rejection] = []
    pending: list[tuple[int, dict[str, str], Path]] = []
    seen: dict[str, tuple[int, tuple[str, ...]]] = {}
    for line, item in read_records(records, limit):
        report.rows_in += 1
        if isinstance(item, Rejection):
            rejected.append(item)
            continue
        name = item.get("file_name", item.get("image_file_name"))
        name = name if isinstance(name, str) else None
        try:
            row = normalize_row(item)
            check_lengths(row, max_question_chars, max_solution_chars)
            row["id"] = row_id(row["question"], row["file_name"], salt)
            content = tuple(row[f] for f in REQUIRED_FIELDS)
            if row["id"] in seen:
                first, first_content = seen[row["id"]]
                if first_content == content:
                    raise RowError(Reason.DUPLICATE, f"same as line {first}")
                raise RowError(Reason.DUPLICATE_ID, f"same question and figure as line {first}, other fields differ")
            seen[row["id"]] = (line, content)
            path = resolve_image(images, row["file_name"])
        except RowError as exc:
            rejected.append(Rejection(line, name, exc.reason, exc.detail))
            continue
        pending.append((line, row, path))

    schema = arrow_schema()
    columns = [f.name for f in schema]
    batch: list[dict[str, Any]] = []
    out_parquet.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(out_parquet, schema) as writer:
        results = clean_images([str(p) for _, _, p in pending], max_size, max_pixels, workers)
        for (line, row, _), result in zip(pending, results, strict=True):
            if result.png is None:
                rejected.append(Rejection(line, row["file_name"], result.reason or Reason.IMAGE_CORRUPT, result.detail))
                continue
            report.kept += 1
            report.resized += result.size != result.original_size
            batch.append({**row, "image": {"bytes": result.png, "path": None}})
            if len(batch) >= batch_rows:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema).select(columns))
                batch.clear()
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))

    rejected.sort(key=lambda r: r.line)
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    quarantine.write_text("".join(r.to_json() + "\n" for r in rejected), encoding="utf-8")
    report.by_reason = {}
    for r in rejected:
        report.by_reason[str(r.reason)] = report.by_reason.get(str(r.reason), 0) + 1
    log.info(
        "cleaned %s: %d rows in, %d kept, %d quarantined %s",
        records.name,
        report.rows_in,
        report.kept,
        report.quarantined,
        report.by_reason,
    )
    return report
