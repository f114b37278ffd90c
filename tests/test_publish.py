"""`pgm push`: the folder a push uploads and its model card, byte for byte against what the run
says of itself; the calls asked of huggingface_hub (its HfApi methods replaced by recorders, the
rest of the path real: there is no Hub here); `pgm.load(..., revision=, token=)`; and every bad
input in one sentence."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

import pgm
from pgm.formats import model_card

REPO = "pgm-lab/tiny-pgm"


def run_facts(run: Path) -> dict:
    """What the run directory says of itself, read from its own files."""
    config = json.loads((run / "config.json").read_text())
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    step = json.loads((checkpoint / "state.json").read_text())["step"]
    validated = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_nll" in line]
    return dict(config=config, checkpoint=checkpoint, step=step, val_nll=round(validated[-1]["val_nll"], 5),
                val_step=validated[-1]["step"])


def expected_readme(run: Path, repo_id: str, license: str) -> str:
    """The card of a push of the text-tiny run `run`, written out here from the run's own values."""
    facts = run_facts(run)
    model, data, train = facts["config"]["model"], facts["config"]["data"], facts["config"]["train"]
    parameters = sum(t.numel() for t in load_file(str(facts["checkpoint"] / "ema.safetensors")).values())
    configuration = ", ".join(f"{key}={value}" for key, value in model.items() if key != "kind")
    tokens = facts["step"] * train["batch_size"] * model["length"]
    return f"""---
library_name: partition-gm
license: {license}
tags:
  - partition-gm
  - pgm
  - diffusion
  - masked-diffusion
  - text-generation
model-index:
  - name: {repo_id.split("/")[1]}
    results:
      - task:
          type: text-generation
        dataset:
          name: {data["source"]}
          type: {data["source"]}
        metrics:
          - name: "validation ELBO (nats/token)"
            type: elbo
            value: {facts["val_nll"]}
---

# A partition-gm pgm model

| | |
|---|---|
| kind | pgm |
| parameters | {parameters / 1e6:.2f}M |
| configuration | {configuration} |
| data | source={data["source"]}, tokenizer={data["tokenizer"]}, packing={data["packing"]} |
| tokens seen | {tokens / 1e6:.2f}M |
| validation | ELBO nats/token={facts["val_nll"]}, step={facts["val_step"]} |
| weights | ema |
| trained or imported from | {run.name}/checkpoints/{facts["checkpoint"].name} |

Load it in Python (pip install "partition-gm[hf]"):

```python
import pgm

pipe = pgm.load("{repo_id}")
```

or sample it on the command line: `pgm sample {repo_id}`.
"""


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def test_the_folder_holds_the_runs_average_its_tokenizer_and_the_card(text_run, tmp_path, pgm_main):
    out = tmp_path / "folder"
    code, stdout, stderr = pgm_main("push", text_run, REPO, "--folder", out, "--license", "mit")
    assert code == 0, stderr
    files = ["README.md", "config.json", "model.safetensors", "tokenizer/tokenizer.json",
             "tokenizer/tokenizer_config.json"]
    assert stdout.splitlines()[1:] == [f"  {name}" for name in files]
    assert stdout.startswith(f"wrote {out} for {REPO} (nothing uploaded): a pgm model, ema weights, 5 files, ")
    contents = folder_contents(out)
    assert sorted(contents) == files
    assert contents["README.md"].decode() == expected_readme(text_run, REPO, "mit")
    facts = run_facts(text_run)
    assert contents["model.safetensors"] == (facts["checkpoint"] / "ema.safetensors").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert contents[f"tokenizer/{name}"] == (text_run / "tokenizer" / name).read_bytes()
    config = json.loads(contents["config.json"])
    data = facts["config"]["data"]
    assert config == {"model": facts["config"]["model"], "card": {
        "data": {"source": data["source"], "tokenizer": data["tokenizer"], "packing": data["packing"]},
        "tokens_seen": facts["step"] * facts["config"]["train"]["batch_size"] * facts["config"]["model"]["length"],
        "weights": "ema", "source": f"{text_run.name}/checkpoints/{facts['checkpoint'].name}",
        "validation": {"ELBO nats/token": facts["val_nll"], "step": facts["val_step"]}, "license": "mit"}}


def test_the_raw_weights_and_the_default_license(text_run, tmp_path, pgm_main):
    code, stdout, stderr = pgm_main("push", text_run, REPO, "--folder", tmp_path / "raw", "--weights", "raw")
    assert code == 0, stderr
    checkpoint = run_facts(text_run)["checkpoint"]
    assert (tmp_path / "raw" / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    readme = (tmp_path / "raw" / "README.md").read_text()
    assert readme == expected_readme(text_run, REPO, "apache-2.0").replace("| weights | ema |", "| weights | raw |")


class HubRecorder:
    """Replaces HfApi's network calls with recorders; what they were asked, in order, and the folder's
    files as they were when the upload was asked for."""

    def __init__(self, monkeypatch, fail_with: Exception | None = None):
        import huggingface_hub

        self.calls, self.uploaded, recorder = [], {}, self

        def create_repo(api, repo_id, **options):
            recorder.calls.append(("create_repo", api.token, repo_id, options))
            if fail_with is not None:
                raise fail_with
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, **options):
            recorder.calls.append(("create_branch", api.token, repo_id, options))

        def upload_folder(api, **options):
            recorder.calls.append(("upload_folder", api.token, options.pop("repo_id"),
                                   {k: v for k, v in options.items() if k != "folder_path"}))
            recorder.folder = Path(options["folder_path"])
            recorder.uploaded = folder_contents(recorder.folder)

        for name, method in (("create_repo", create_repo), ("create_branch", create_branch),
                             ("upload_folder", upload_folder)):
            monkeypatch.setattr(huggingface_hub.HfApi, name, method)


def test_push_asks_the_hub_for_the_repository_the_branch_and_the_folder(text_run, tmp_path, pgm_main, monkeypatch):
    hub = HubRecorder(monkeypatch)
    code, stdout, stderr = pgm_main("push", text_run, REPO, "--private", "--revision", "v1", "--token", "hf_write",
                                    "--license", "mit")
    assert code == 0, stderr
    assert hub.calls == [
        ("create_repo", "hf_write", REPO, {"private": True, "exist_ok": True}),
        ("create_branch", "hf_write", REPO, {"branch": "v1", "exist_ok": True}),
        ("upload_folder", "hf_write", REPO, {"revision": "v1",
                                             "commit_message": "Upload a partition-gm pgm model (ema weights) with "
                                                               "pgm push"})]
    assert stdout.startswith(f"pushed {text_run} to https://huggingface.co/{REPO} (revision v1): a pgm model, ema "
                             "weights, 5 files, ")
    assert not hub.folder.exists()  # the temporary folder is gone
    assert pgm_main("push", text_run, REPO, "--folder", tmp_path / "written", "--license", "mit")[0] == 0
    assert hub.uploaded == folder_contents(tmp_path / "written")


def test_push_to_main_of_a_public_repository_with_a_message(text_run, pgm_main, monkeypatch):
    hub = HubRecorder(monkeypatch)
    code, _, stderr = pgm_main("push", text_run, REPO, "--commit-message", "step 20")
    assert code == 0, stderr
    assert hub.calls == [("create_repo", None, REPO, {"private": False, "exist_ok": True}),
                         ("upload_folder", None, REPO, {"revision": None, "commit_message": "step 20"})]
    assert hub.uploaded["README.md"].decode() == expected_readme(text_run, REPO, "apache-2.0")


def test_what_was_pushed_loads_at_its_revision(text_run, tmp_path, pgm_main, monkeypatch):
    import huggingface_hub

    hub = HubRecorder(monkeypatch)
    assert pgm_main("push", text_run, REPO, "--revision", "v1")[0] == 0
    snapshot = tmp_path / "snapshot"
    for name, content in hub.uploaded.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(content)
    asked = []

    def snapshot_download(repo_id, **options):
        asked.append((repo_id, options))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = pgm.load(REPO, revision="v1", token="hf_read", device="cpu")
    assert asked == [(REPO, {"revision": "v1", "token": "hf_read"})]
    original = pgm.load(text_run, device="cpu")
    assert pipe.generate(num_samples=2, steps=4, seed=9) == original.generate(num_samples=2, steps=4, seed=9)
    model = pgm.from_pretrained(REPO, revision="v2")
    assert asked[-1] == (REPO, {"revision": "v2", "token": None})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.model.state_dict().values()))


def test_a_file_in_a_repository_is_downloaded_at_the_revision(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def hf_hub_download(repo_id, filename, **options):
        asked.append((repo_id, filename, options))
        raise huggingface_hub.errors.RevisionNotFoundError("no such revision")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(ValueError, match=r"^could not download 'jdeschena/pgm/pgm_8_8.ckpt' at revision 'nope' "):
        pgm.from_pretrained("jdeschena/pgm/pgm_8_8.ckpt", revision="nope", token="hf_read")
    assert asked == [("jdeschena/pgm", "pgm_8_8.ckpt", {"revision": "nope", "token": "hf_read"})]


def test_revision_and_token_are_refused_for_a_local_path(text_run):
    with pytest.raises(ValueError, match=r"^revision and token apply to Hub ids only, and .* is a local path: leave "
                                         r"them out$"):
        pgm.load(text_run, revision="v1", token="hf_read")
    with pytest.raises(ValueError, match=r"^token applies to Hub ids only"):
        pgm.from_pretrained(text_run, token="hf_read")


def assert_one_sentence(result, *fragments):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_without_huggingface_hub_a_push_names_the_extra_and_the_folder_still_works(text_run, tmp_path, pgm_main,
                                                                                   without_package):
    without_package("huggingface_hub")
    assert_one_sentence(pgm_main("push", text_run, REPO),
                        "pgm push needs huggingface_hub: pip install 'partition-gm[hf]'")
    assert pgm_main("push", text_run, REPO, "--folder", tmp_path / "offline")[0] == 0


def test_a_refusal_of_the_hub_is_one_sentence(text_run, pgm_main, monkeypatch):
    from huggingface_hub.errors import LocalTokenNotFoundError

    HubRecorder(monkeypatch, fail_with=LocalTokenNotFoundError("Token is required, but no token found.\nRun `hf auth "
                                                               "login`."))
    assert_one_sentence(pgm_main("push", text_run, REPO),
                        f"could not push to {REPO} on the Hugging Face Hub (LocalTokenNotFoundError: Token is "
                        "required, but no token found.)")


@pytest.fixture(scope="module")
def run_without_average(tmp_path_factory):
    from pgm.train import train

    run = tmp_path_factory.mktemp("no-ema") / "run"
    train(tiny_config(ema=0, max_steps=2), run, log=lambda *a: None)
    return run


def test_bad_inputs_are_one_sentence_each(text_run, run_without_average, tmp_path, pgm_main):
    from conftest import tiny_mdlm
    from test_mdlm_owt import write_mdlm_owt

    (tmp_path / "empty").mkdir()
    (tmp_path / "file.ckpt").write_bytes(b"")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    owt = write_mdlm_owt(tmp_path / "owt", tiny_mdlm())
    cases = [
        ((tmp_path / "empty", REPO), "is not a run or a pretrained directory (it has no config.json)"),
        ((tmp_path / "missing", REPO), "missing does not exist"),
        ((tmp_path / "file.ckpt", REPO), "is a file, not a run or a pretrained directory"),
        ((owt, REPO), "is in transformers' layout, not a run or a pretrained directory: convert it first"),
        ((text_run, "tiny-pgm"), "'tiny-pgm' is not a Hub repository id: write OWNER/NAME"),
        ((text_run, "pgm-lab/tiny--pgm"), "'pgm-lab/tiny--pgm' is not a Hub repository id"),
        ((text_run, "pgm-lab/tiny/pgm"), "'pgm-lab/tiny/pgm' is not a Hub repository id"),
        ((run_without_average, REPO, "--weights", "ema"), "kept no average of its weights (train.ema=0)"),
        ((text_run, REPO, "--folder", tmp_path / "full"), "already exists and is not an empty directory"),
        ((text_run, REPO, "--folder", tmp_path / "x", "--private", "--revision", "v1"),
         "--private, --revision apply to an upload, and --folder uploads nothing"),
    ]
    for arguments, fragment in cases:
        assert_one_sentence(pgm_main("push", *arguments), fragment)
    assert not (tmp_path / "x").exists() and sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]
    assert pgm_main("push", run_without_average, REPO, "--folder", tmp_path / "raw")[0] == 0  # its raw weights
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["card"]["weights"] == "raw"


@pytest.mark.parametrize("config,card,tags,extra", [
    ({"kind": "mdlm"}, {"data": {"source": "hf:roneneldan/TinyStories:default"},
                        "validation": {"ELBO nats/token": 2.5, "step": 7}},
     ["mdlm", "diffusion", "masked-diffusion", "text-generation"],
     """datasets:
  - roneneldan/TinyStories
model-index:
  - name: tiny-pgm
    results:
      - task:
          type: text-generation
        dataset:
          name: roneneldan/TinyStories
          type: roneneldan/TinyStories
          config: default
        metrics:
          - name: "validation ELBO (nats/token)"
            type: elbo
            value: 2.5
"""),
    ({"kind": "ar"}, {"data": {"source": "corpus.jsonl"}}, ["ar", "text-generation"], ""),
    ({"kind": "pgm", "num_classes": 10}, {"data": {"source": "hf:zalando-datasets/fashion_mnist"},
                                          "validation": {"cross-entropy nats/code": 1.25, "step": 3}},
     ["pgm", "diffusion", "masked-diffusion", "image-generation"],
     """datasets:
  - zalando-datasets/fashion_mnist
model-index:
  - name: tiny-pgm
    results:
      - task:
          type: image-generation
        dataset:
          name: zalando-datasets/fashion_mnist
          type: zalando-datasets/fashion_mnist
        metrics:
          - name: "validation cross-entropy (nats/code)"
            type: cross-entropy
            value: 1.25
"""),
    ({"kind": "maskgit", "num_classes": 10}, {"license": "cc-by-4.0"}, ["maskgit", "image-generation"], ""),
    ({"kind": "vq"}, {"data": {"source": "fashion-mnist"}, "validation": {"MSE per pixel on [-1, 1]": 0.01}},
     ["vq", "image-to-image"],
     """model-index:
  - name: tiny-pgm
    results:
      - task:
          type: image-to-image
        dataset:
          name: fashion-mnist
          type: fashion-mnist
        metrics:
          - name: "validation MSE (per pixel on [-1, 1])"
            type: mse
            value: 0.01
"""),
], ids=["mdlm-hub-data", "ar-local-data", "image-pgm", "maskgit-license", "vq"])
def test_the_front_matter_of_each_kind(config, card, tags, extra):
    text = model_card(config, 1000, card, REPO)
    license = card.get("license", "apache-2.0")
    tag_lines = "".join(f"  - {tag}\n" for tag in ["partition-gm", *tags])
    assert text.startswith(f"---\nlibrary_name: partition-gm\nlicense: {license}\ntags:\n{tag_lines}{extra}---\n\n"
                           f"# A partition-gm {config['kind']} model\n")
    yaml = pytest.importorskip("yaml")
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["library_name"] == "partition-gm" and metadata["tags"] == ["partition-gm", *tags]
    huggingface_hub = pytest.importorskip("huggingface_hub")
    results = huggingface_hub.ModelCard(text).data.eval_results or []  # the Hub's own reading of model-index
    assert [(r.task_type, r.metric_type, r.metric_value) for r in results] == (
        [] if "validation" not in card else [(metadata["model-index"][0]["results"][0]["task"]["type"],
                                              metadata["model-index"][0]["results"][0]["metrics"][0]["type"],
                                              next(iter(card["validation"].values())))])


def test_a_directory_card_keeps_its_placeholder_and_no_dates(text_run, tmp_path):
    model = pgm.from_pretrained(text_run)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    card = (tmp_path / "a" / "README.md").read_text()
    assert card == (tmp_path / "b" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: partition-gm\n") and "  - name: partition-gm-pgm\n" in card
    assert card.endswith("Load it with `pgm.load(\"THIS_DIRECTORY\")` in Python or `pgm sample THIS_DIRECTORY` on "
                         "the command line (pip install partition-gm).\n")


def test_an_image_model_travels_with_its_vq_and_one_that_only_names_it_is_refused(tmp_path, pgm_main):
    from test_released_images import tiny_image_pgm, tiny_vq, write_image_checkpoint

    from pgm.pipeline import convert

    write_image_checkpoint(tmp_path / "image.ckpt", tiny_image_pgm())
    torch.save({"model": tiny_vq().state_dict()}, tmp_path / "vq.pt")
    convert(tmp_path / "image.ckpt", tmp_path / "held", vq=tmp_path / "vq.pt")
    convert(tmp_path / "image.ckpt", tmp_path / "named", vq=tmp_path / "vq.pt", vq_reference=True)
    code, _, stderr = pgm_main("push", tmp_path / "held", REPO, "--folder", tmp_path / "folder")
    assert code == 0, stderr
    held = folder_contents(tmp_path / "folder")
    assert sorted(held) == ["README.md", "config.json", "model.safetensors", "tokenizer/README.md",
                            "tokenizer/config.json", "tokenizer/model.safetensors", "tokenizer/tokenizer_config.json"]
    assert held["tokenizer/model.safetensors"] == (tmp_path / "held" / "tokenizer" / "model.safetensors").read_bytes()
    assert "\n  - image-generation\n" in held["README.md"].decode()
    assert_one_sentence(pgm_main("push", tmp_path / "named", REPO, "--folder", tmp_path / "refused"),
                        f"'s VQ tokenizer is only named ({(tmp_path / 'vq.pt').resolve()}), a path the Hub cannot "
                        "reach")
