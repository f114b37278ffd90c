"""The README is the front door and docs/*.md the rooms behind it: every Python block in them runs,
and every `pgm` command in them parses with today's command line; those that only need a run, a
pretrained directory or a checkpoint file run too, against tiny stand-ins made under the names the
pages use (runs/text-small is a text-tiny run of length 128, runs/copy its fine-tuning on the
built-in pairs, runs/fmnist-pgm an image-pgm-tiny run, pgm_8_8.ckpt, the image checkpoints and
vq_ds8_c2i.pt small files in the released layouts). A block or command that appears on several
pages runs once. Every relative link and anchor of the pages
resolves."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import redraw_zero_initialised

import pgm
from pgm.cli import build_parser, parse_arguments

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def in_reading_order(pages: list[Path]) -> list[Path]:
    """The pages in the order the README first links them, any it does not link at the end."""
    text = README.read_text()
    place = {page: text.find(f"](docs/{page.name})") for page in pages}
    return sorted(pages, key=lambda page: (place[page] < 0, place[page], page.name))


DOCS = in_reading_order(list((ROOT / "docs").glob("*.md")))  # the docs pages; docs/*/ holds results
PAGES = [*DOCS, README]  # the README last: the commands it repeats have run by then, where they can
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
RUNNABLE = ("sample", "eval", "convert")
NOT_HERE = ("--fid", "--inception")  # need Fashion-MNIST's classifier or Inception weights


def blocks(page: Path = README) -> list[tuple[str, str]]:
    """(kind, text) of a page's blocks in order: "python" code, and each `pgm` command of the
    bash blocks and of the `$ pgm ...` lines shown with their output. A Python block that does not
    start with an import continues the one before it on the same page, and runs after it."""
    found, script = [], ""
    for language, body in BLOCK.findall(page.read_text()):
        if language == "python":
            script = body if body.startswith(("import", "from")) else script + body
            found.append(("python", script))
            continue
        lines = body.replace("\\\n", " ").splitlines()
        if language != "bash":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        for line in lines:
            for part in re.sub(r"\s#.*$", "", line).split("&&"):
                words = shlex.split(part)
                if "pgm" in words:
                    found.append(("command", shlex.join(words[words.index("pgm"):])))
    return found


def all_blocks() -> list[tuple[str, str, str]]:
    """(page, kind, text) of every page's blocks, each distinct (kind, text) once, where it first appears."""
    found, seen = [], set()
    for page in PAGES:
        for kind, text in blocks(page):
            if (kind, text) not in seen:
                seen.add((kind, text))
                found.append((page.relative_to(ROOT).as_posix(), kind, text))
    return found


BLOCKS = all_blocks()


@pytest.fixture(scope="module")
def front_door(tmp_path_factory, request):
    """A directory holding the stand-ins under the pages' names."""
    from test_official import hyper_config, tiny_pgm_config, write_checkpoint

    from pgm.data.tokenizers import find_gpt2_file
    from pgm.presets import preset
    from pgm.train import train

    root = tmp_path_factory.mktemp("readme")
    for name, kind in (("text-small", "text-tiny"), ("ar-small", "ar-tiny")):
        config = preset(kind).with_overrides(["model.length=128", "train.max_steps=6"])
        train(config, root / "runs" / name, log=lambda *a: None)
    copy = preset("text-tiny").with_overrides([f"train.init_from={root / 'runs' / 'text-small'}", "data.format=pairs",
                                               "data.packing=pad", "model.length=64", "train.max_steps=2"])
    train(copy, root / "runs" / "copy", log=lambda *a: None)  # the fine-tuned run the pages show
    torch.manual_seed(0)
    model = redraw_zero_initialised(pgm.PartitionTransformer(tiny_pgm_config(vocab_size=50258, length=160)))
    write_checkpoint(root / "pgm_8_8.ckpt", model, hyper_config({"length": 160}))
    gpt2 = find_gpt2_file()
    if gpt2 is not None:
        shutil.copyfile(gpt2, root / "gpt2.tiktoken")
    from conftest import tiny_mdlm
    from test_mdlm_owt import write_mdlm_owt

    # kuleshov-group/mdlm-owt's layout, GPT-2's vocabulary and its mask
    write_mdlm_owt(root / "mdlm-owt", tiny_mdlm(vocab_size=50258, length=160, hidden_size=16, num_heads=2, blocks=1,
                                                cond_dim=8))
    from test_released_images import tiny_image_pgm, tiny_maskgit, tiny_vq, write_image_checkpoint

    for name in ("images_pgm_12_12_100epochs.ckpt", "images_pgm_14_10_100epochs.ckpt"):
        write_image_checkpoint(root / name, tiny_image_pgm(num_classes=1000))
    write_image_checkpoint(root / "maskgit_100epochs.ckpt", tiny_maskgit(num_classes=1000))
    torch.save({"model": tiny_vq().state_dict()}, root / "vq_ds8_c2i.pt")
    from PIL import Image

    Image.new("RGB", (300, 200), (90, 140, 30)).save(root / "photo.jpg")
    try:
        images = request.getfixturevalue("image_runs")
    except pytest.skip.Exception:
        images = None
    if images is not None:
        from PIL import Image

        for name in ("vq", "pgm", "maskgit"):
            shutil.copytree(images / name, root / "runs" / f"fmnist-{name}")
        Image.new("L", (28, 28), 128).save(root / "my-shirt.png")
    return root


def needs(text: str) -> list[str]:
    """The pages' names that `text` reads."""
    return sorted(set(re.findall(r"(?:runs|models|imagenet)/[\w.-]+|[\w-]+\.(?:ckpt|pt|pth|jpg)|my-model|"
                                 r"my-shirt\.png|gpt2\.tiktoken", text)))


def missing_inputs(root: Path, text: str, writes: tuple[str, ...] = ()) -> list[str]:
    return [name for name in needs(text) if name not in writes and not (root / name).exists()]


@pytest.mark.parametrize("page,kind,text", BLOCKS,
                         ids=[f"{Path(p).stem}:{i}:{t[:50]}" for i, (p, _, t) in enumerate(BLOCKS)])
def test_the_readme(front_door, page, kind, text):
    if kind == "python":
        missing = missing_inputs(front_door, text, writes=("my-model",))
        if missing:
            pytest.skip(f"needs {', '.join(missing)}, which this machine cannot make (is Fashion-MNIST installed?)")
        done = subprocess.run([sys.executable, "-c", text], cwd=front_door, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    argv = shlex.split(text)[1:]
    try:
        parse_arguments(build_parser(), argv)
    except SystemExit:
        pytest.fail(f"{page}'s `{text}` does not parse")
    writes = (argv[3],) if argv[0] == "convert" else ()
    if argv[0] not in RUNNABLE or any(flag in argv for flag in NOT_HERE) or missing_inputs(front_door, text, writes):
        return  # parsing is all that can be checked here (training, benchmarks, network, FID weights)
    done = subprocess.run([sys.executable, "-m", "pgm", *argv], cwd=front_door, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_readme_has_the_blocks_it_should():
    kinds = [kind for _, kind, _ in BLOCKS]
    assert kinds.count("python") >= 10 and kinds.count("command") >= 60
    front = blocks(README)
    assert any("pgm.load" in text for kind, text in front if kind == "python")
    assert sum(kind == "command" for kind, _ in front) >= 15
    pages = {page.stem for page in PAGES}
    assert {"training", "sampling", "python", "server", "evaluation", "distillation", "images", "checkpoints",
            "benchmarks", "layout"} <= pages
    for page in DOCS:
        assert f"](docs/{page.name})" in README.read_text(), f"the README's table of contents misses {page.name}"


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated one numbered."""
    found, counts = set(), {}
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
        counts[slug] = counts.get(slug, 0) + 1
    return found


LINKED = [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", LINKED, ids=[page.relative_to(ROOT).as_posix() for page in LINKED])
def test_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what is not there: {broken}"
