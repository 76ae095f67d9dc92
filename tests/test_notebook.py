"""How results and plans look in Jupyter, and which progress bar the library makes (no kernel needed)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import re
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as plain_tqdm

from zimage_turbo import GPUInfo, Hardware, ModelProfile, plan
from zimage_turbo.hardware import GIB
from zimage_turbo.planner import Plan
from zimage_turbo.progress import tqdm_class
from zimage_turbo.result import GRID_GAP, GenerationResult, Timings, image_grid

# A GPU name with characters that mean something in HTML and in Markdown.
ODD_NAME = "RTX <b>4090</b> & co | *fast* _x_"


def odd_plan() -> Plan:
    gpu = GPUInfo(0, ODD_NAME, 12 * GIB, 12 * GIB, compute_capability=(8, 9))
    return plan(ModelProfile.z_image_turbo(), Hardware(gpus=(gpu,), host_available_bytes=64 * GIB))


class Cells(HTMLParser):
    """The rows of every table (a list of cell texts each) and all text outside tables."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.outside: list[str] = []
        self.tags: list[str] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        self.tags.pop()
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)
        else:
            self.outside.append(data)


def test_str_of_a_plan_is_its_table() -> None:
    ranking = odd_plan()
    assert str(ranking) == ranking.describe()
    assert "verdict" in str(ranking)


def test_plan_html_is_a_table_of_every_candidate_with_text_escaped() -> None:
    ranking = odd_plan()
    parser = Cells()
    parser.feed(ranking._repr_html_())
    parser.close()
    assert not parser.tags  # every tag closed: the GPU name made no <b> of its own
    header, *rows = parser.rows
    assert header == ["", "strategy", "GPU peak", "host RAM", "s/image*", "verdict"]
    assert [row[1] for row in rows] == [c.name for c in ranking.candidates]
    assert all(len(row) == 6 for row in rows)
    assert ranking.best is not None
    assert [row[0] for row in rows].count("best") == 1 and rows[0][0] == "best"
    assert [row[5] for row in rows] == ["fits" if c.fits else c.reason for c in ranking.candidates]
    # the name comes back exactly as it was: escaped, not interpreted
    assert any(ODD_NAME in text for text in parser.outside)


def test_plan_markdown_is_a_table_of_every_candidate_with_text_escaped() -> None:
    ranking = odd_plan()
    text = ranking._repr_markdown_()
    assert "<" not in text  # no inline HTML can start
    table = [line for line in text.splitlines() if line.startswith("|")]
    header, rule, *rows = table
    assert len(rows) == len(ranking.candidates)

    def cells(line: str) -> list[str]:
        # cells are split by the pipes that are not escaped; then the escapes are undone
        parts = re.split(r"(?<!\\)\|", line)[1:-1]
        return [re.sub(r"\\(.)", r"\1", part.strip()).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
                for part in parts]  # fmt: skip

    assert cells(header) == ["", "strategy", "GPU peak", "host RAM", "s/image*", "verdict"]
    assert rule.count("---") == 6
    parsed = [cells(row) for row in rows]
    assert [row[1] for row in parsed] == [c.name for c in ranking.candidates]
    assert [row[5] for row in parsed] == ["fits" if c.fits else c.reason for c in ranking.candidates]
    hardware_line = next(line for line in text.splitlines() if line.startswith("Hardware"))
    assert "\\|" in hardware_line and "\\*fast\\*" in hardware_line and "&lt;b&gt;" in hardware_line


def result_of(*images: Image.Image) -> GenerationResult:
    return GenerationResult(
        images=images,
        prompt="p",
        seeds=tuple(range(len(images))),
        width=images[0].width,
        height=images[0].height,
        steps=1,
        guidance_scale=0.0,
        strategy="cpu",
        device="cpu",
        dtype="float32",
        timings=Timings(),
    )


def shown(result: GenerationResult) -> Image.Image:
    png = result._repr_png_()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png)).convert("RGB")


def test_one_image_shows_as_itself() -> None:
    image = Image.new("RGB", (64, 32), (10, 20, 30))
    picture = shown(result_of(image))
    assert picture.size == (64, 32) and picture.getpixel((5, 5)) == (10, 20, 30)


def test_several_images_show_as_a_grid_of_all_of_them() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    picture = shown(result_of(*(Image.new("RGB", (64, 32), c) for c in colours)))
    # 3 images: 2 columns, 2 rows, a gap between tiles
    assert picture.size == (2 * 64 + GRID_GAP, 2 * 32 + GRID_GAP)
    assert picture.getpixel((10, 10)) == colours[0]
    assert picture.getpixel((64 + GRID_GAP + 10, 10)) == colours[1]
    assert picture.getpixel((10, 32 + GRID_GAP + 10)) == colours[2]
    assert picture.getpixel((64 + GRID_GAP + 10, 32 + GRID_GAP + 10)) == (255, 255, 255)  # the empty cell


def test_a_large_grid_is_shrunk_to_fit() -> None:
    images = [Image.new("RGB", (300, 100), (k * 50, 0, 0)) for k in range(5)]  # 3 columns, 2 rows
    grid = image_grid(images, gap=4, max_side=500)
    assert max(grid.size) <= 500
    tile = (500 - 2 * 4) // 3
    assert grid.size == (3 * tile + 2 * 4, 2 * int(100 * tile / 300) + 4)


@pytest.fixture
def no_ipywidgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """ipywidgets cannot be imported (None in sys.modules makes every import of it fail)."""
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(ImportError):
        import ipywidgets  # noqa: F401


def test_without_ipywidgets_the_plain_text_bar_is_used(no_ipywidgets: None) -> None:
    assert tqdm_class() is plain_tqdm


def test_with_ipywidgets_tqdm_auto_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        if name == "ipywidgets":
            return importlib.machinery.ModuleSpec("ipywidgets", None)
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert tqdm_class() is auto_tqdm


def test_the_library_bars_use_that_choice(no_ipywidgets: None) -> None:
    from zimage_turbo.batch import _progress as images_bar
    from zimage_turbo.generator import _progress as prompts_bar

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm's "IProgress not found" is a warning
        bars = [images_bar(2, enabled=True), prompts_bar([], enabled=True)]
    try:
        assert [type(bar) for bar in bars] == [plain_tqdm, plain_tqdm]
    finally:
        for bar in bars:
            bar.close()


def test_the_denoising_bar_of_a_loaded_pipeline_uses_that_choice(
    no_ipywidgets: None, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zimage_turbo.progress
    from zimage_turbo import Generator, ZImageSettings

    with Generator(tiny_checkpoint, settings=ZImageSettings(progress=False), load=True) as generator:
        pipeline = generator.pipeline
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bar = pipeline.progress_bar(total=3)
        try:
            assert type(bar) is plain_tqdm and bar.total == 3
            assert bar.disable  # the options of set_progress_bar_config still apply (progress=False)
        finally:
            bar.close()
        # and it is the bar diffusers' denoising loop makes
        made: list[type] = []
        choose = zimage_turbo.progress.tqdm_class
        monkeypatch.setattr(zimage_turbo.progress, "tqdm_class", lambda: made.append(choose()) or choose())
        assert generator.generate("a cat", width=256, height=256, steps=1, seed=0).image.size == (256, 256)
        assert made == [plain_tqdm]
