"""The DreamBench harness: data set and prompts, a full run on the tiny model, resume, sharding, reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.evaluation import harness, rows
from personalize.utils import trees
from personalize.evaluation.toybench import toy_subjects
from personalize.evaluation.subjects import (
    KINDS, LaunchState, load_dreambench, parse_prompts_file, prompt_kind, shard,
)
from personalize.evaluation.harness import evaluate_subject, run_benchmark
from personalize.evaluation.settings import EvalSettings
from personalize.metrics import SubjectMetrics
from personalize.evaluation.rows import Row

ROOT = Path(__file__).resolve().parent.parent
SHARED = next((p for p in (ROOT / "shared" / "dreambench", ROOT.parent / "shared" / "dreambench")
               if (p / "prompts_and_classes.txt").is_file()), None)
OBJECT_PROMPTS = ["a {0} {1} in the jungle", "a {0} {1} on the beach", "a {0} {1} with a city in the background",
                  "a red {0} {1}", "a cube shaped {0} {1}"]
LIVE_PROMPTS = ["a {0} {1} in the snow", "a {0} {1} wearing a santa hat", "a {0} {1} in a chef outfit",
                "a purple {0} {1}", "a wet {0} {1}"]


def write_bench(folder: Path, subjects: dict[str, str], photos: int = 3) -> Path:
    """A small folder in DreamBench's layout: synthetic photos and a prompts_and_classes.txt."""
    lines = ["Classes", "", "subject_name,class", *[f"{n},{c}" for n, c in subjects.items()], "", "Prompts", ""]
    for title, prompts in (("Object Prompts", OBJECT_PROMPTS), ("Live Subject Prompts", LIVE_PROMPTS)):
        lines += [title, "", "prompt_list = ["]
        lines += [f"'{p}'.format(unique_token, class_token)," for p in prompts] + ["]", ""]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts_and_classes.txt").write_text("\n".join(lines))
    rng = np.random.default_rng(0)
    for k, name in enumerate(subjects):
        (folder / name).mkdir()
        for i in range(photos):
            pixels = np.clip(rng.normal(60 + 60 * k, 40, (96, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:02d}.jpg")
    return folder


# -- data set and prompts -------------------------------------------------------------------------

@pytest.mark.skipif(SHARED is None, reason="shared/dreambench (six DreamBench subjects) is not beside this checkout")
def test_shared_dreambench_subjects_and_prompts():
    subjects = load_dreambench(SHARED)
    assert [s.name for s in subjects] == ["backpack", "cat", "dog", "duck_toy", "teapot", "vase"]
    assert sum(len(s.references) for s in subjects) == 31
    assert {s.name: s.class_noun for s in subjects}["duck_toy"] == "toy"
    assert {s.name for s in subjects if s.live} == {"cat", "dog"}
    lists = parse_prompts_file(SHARED / "prompts_and_classes.txt")
    assert len(lists.classes) == 30 and len(lists.object_prompts) == 25 and len(lists.live_prompts) == 25
    count = lambda prompts: [sum(prompt_kind(p) == k for p in prompts) for k in KINDS]  # noqa: E731
    assert count(lists.object_prompts) == [20, 0, 5]
    assert count(lists.live_prompts) == [10, 10, 5]
    dog = next(s for s in subjects if s.name == "dog")
    assert dog.prompts[10].text("sks dog") == "a sks dog wearing a red hat"
    assert dog.prompts[24].text("dog") == "a cube shaped dog"
    assert len(load_dreambench(SHARED, ["vase"], [0, 24])[0].prompts) == 2


def test_prompt_kinds_rule():
    assert prompt_kind("a {} on top of pink fabric") == "recontextualization"
    assert prompt_kind("a {} wearing a black top hat and a monocle") == "accessorization"
    assert prompt_kind("a {} in a purple wizard outfit") == "accessorization"
    assert prompt_kind("a cube shaped {}") == "property"
    assert prompt_kind("a big {}") == "property"


def test_toy_subjects_have_toybench_prompts_and_references(tmp_path):
    from personalize.evaluation.toybench import toybench_prompts
    from personalize.toyworld.world import heldout_subjects

    (subject,) = toy_subjects(["zorbo"], tmp_path)
    toy = {s.name: s for s in heldout_subjects()}["zorbo"]
    assert [p.kind for p in subject.prompts] == [p.kind for p in toybench_prompts(toy)]  # the same rule
    assert len(subject.references) == 4 and all(p.is_file() for p in subject.references)
    assert subject.prompts[0].text(f"sks {toy.cls}") == toybench_prompts(toy)[0].text(f"sks {toy.cls}")


def test_data_errors_name_what_is_wrong(tmp_path):
    from personalize.data.images import DataError

    bench = write_bench(tmp_path / "bench", {"dog": "dog"})
    with pytest.raises(DataError, match="no photos of cat"):
        load_dreambench(bench, ["cat"])
    with pytest.raises(DataError, match="out of range"):
        load_dreambench(bench, None, [7])


# -- the full harness on the tiny model -----------------------------------------------------------

class HtmlRefs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def assert_html_refers_to_existing_files(html_file: Path) -> int:
    parser = HtmlRefs()
    parser.feed(html_file.read_text())
    files = [r for r in parser.refs if not r.startswith("#")]
    assert files, "the report shows no images"
    for ref in files:
        assert "://" not in ref and not ref.startswith("/"), f"{ref}: the report must open from disk anywhere"
        assert (html_file.parent / unquote(ref)).is_file(), f"{html_file} refers to missing {ref}"
    return len(files)


def _eval(bench: Path, out: Path, *extra: str) -> int:
    from personalize.cli import main

    return main(["eval", "tiny/lora", "base", "--data", str(bench), "--prompts", "0,3", "-n", "2", "--steps", "2",
                 "--metrics", "tiny", "--set", "train.max_steps=2", "--set", "train.progress_bar=false",
                 "--out", str(out), *extra])


def test_full_run_on_the_tiny_model_then_rerun_skips(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    bench = write_bench(tmp_path / "bench", {"dog": "dog", "teapot": "teapot"})
    out = tmp_path / "out"
    assert _eval(bench, out, "--keep-weights") == 0
    files = [out / "results.json", out / "report.md", out / "report.html"]
    assert all(f.is_file() for f in files)
    results = json.loads(files[0].read_text())
    assert list(results["table"]) == ["real images", "lora", "base"] and results["pending"] == []
    assert set(results["table"]["lora"]["mean"]) == {"dino", "clip_i", "clip_t"}
    dog = results["subjects"]["dog"]["rows"]["lora"]
    assert [p["prompt"] for p in dog["prompts"]] == ["a sks dog in the snow", "a purple sks dog"]
    assert [p["metric_prompt"] for p in dog["prompts"]] == ["a dog in the snow", "a purple dog"]  # no unique token
    assert set(dog["kinds"]) == {"recontextualization", "property"}
    assert dog["train_seconds"] > 0 and dog["generate_seconds"] > 0 and dog["peak_memory_train_mib"] > 0
    assert dog["stats"]["train_steps"] == 2
    base = results["subjects"]["teapot"]["rows"]["base"]
    assert base["prompts"][0]["prompt"] == "a teapot in the jungle" and base["train_seconds"] is None
    assert all((out / p).is_file() for r in (dog, base) for q in r["prompts"] for p in q["images"])
    assert len(dog["prompts"][0]["images"]) == 2
    md = files[1].read_text()
    assert "| real images |" in md and "property modification" in md and "CLIP-T" in md
    assert assert_html_refers_to_existing_files(files[2]) >= 2 * 2 * 2 * 2 + 6

    # a rerun trains and generates nothing, and rewrites the same table
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished subject was run again")

    monkeypatch.setattr("personalize.training.trainer.Trainer", forbidden)
    monkeypatch.setattr(rows, "generate_images", forbidden)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")}
    assert _eval(bench, out) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")} == before
    assert json.loads(files[0].read_text())["table"] == results["table"]

    # a subject whose training finished but whose images did not: generated again, not trained again
    monkeypatch.undo()
    monkeypatch.setattr("personalize.training.trainer.Trainer", forbidden)
    (out / "lora" / "dog" / "result.json").unlink()
    assert _eval(bench, out) == 0
    again = json.loads(files[0].read_text())["subjects"]["dog"]["rows"]["lora"]
    assert again["train_seconds"] == dog["train_seconds"] and not (out / "lora" / "dog" / "run").exists()


# -- logic with stand-in rows and metrics (no diffusion) ------------------------------------------

class SolidRow(Row):
    """Images of one flat color per prompt (what a method "generates", instantly)."""
    kind = "zero-shot"

    def __init__(self, label="solid"):
        self.label, self.calls = label, []

    def generate(self, subject, work_dir, settings):
        self.calls.append(subject.name)
        texts = [p.text(f"{settings.token} {subject.class_noun}") for p in subject.prompts]
        return texts, [[Image.new("RGB", (32, 32), (40 * p.index, 90, 200))] * settings.images_per_prompt
                       for p in subject.prompts]


class RecordingMetric(SubjectMetrics):
    image_metric, text_metric = "mean_color", "prompt_seen"

    def __init__(self):
        self.prompts = []

    def embed_images(self, images):
        return torch.tensor(np.array([np.asarray(i, dtype=np.float64).mean((0, 1)) + 1 for i in images]))

    def text_similarity(self, images, prompts):
        self.prompts.append(prompts)
        return 1.0


def test_metrics_see_the_class_noun_prompt_without_the_unique_token(tmp_path):
    bench = write_bench(tmp_path / "bench", {"cat": "cat"})
    (subject,) = load_dreambench(bench)
    metric, settings = RecordingMetric(), EvalSettings(out=str(tmp_path / "out"), images_per_prompt=2)
    result = evaluate_subject(SolidRow(), subject, [metric], settings, log=lambda m: None)
    assert metric.prompts == ["a cat in the snow", "a cat wearing a santa hat", "a cat in a chef outfit",
                              "a purple cat", "a wet cat"]
    assert all("sks" in p["prompt"] for p in result["prompts"])
    assert set(result["kinds"]) == set(KINDS) and result["kinds"]["accessorization"]["prompts"] == 2


def test_sharding_round_robin_with_a_fake_state():
    class FakeState:  # what accelerate.PartialState offers
        def __init__(self, index, count):
            self.process_index, self.num_processes = index, count

    items = list("abcde")
    shares = [shard(items, FakeState(i, 2)) for i in range(2)]
    assert shares == [["a", "c", "e"], ["b", "d"]]
    assert sorted(sum((shard(items, FakeState(i, 3)) for i in range(3)), [])) == items
    with pytest.raises(ValueError):
        shard(items, FakeState(2, 2))
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert LaunchState.from_environment(env) == LaunchState(3, 4, 1)
    assert LaunchState.from_environment({}) == LaunchState(0, 1, 0)


def test_processes_share_subjects_and_the_last_report_is_complete(tmp_path):
    bench = write_bench(tmp_path / "bench", {"dog": "dog", "teapot": "teapot", "vase": "vase"})
    subjects = load_dreambench(bench, prompt_indices=[0, 4])
    settings = EvalSettings(out=str(tmp_path / "out"), images_per_prompt=2)
    first, second = SolidRow(), SolidRow()
    quiet = dict(log=lambda m: None, data=str(bench))
    files = run_benchmark(subjects, [first], [RecordingMetric()], settings, state=LaunchState(1, 2), **quiet)
    assert first.calls == ["teapot"]
    pending = json.loads(files["json"].read_text())["pending"]
    assert pending == ["solid/dog", "solid/vase"] and "Pending (2)" in files["markdown"].read_text()
    assert_html_refers_to_existing_files(files["html"])
    files = run_benchmark(subjects, [second], [RecordingMetric()], settings, state=LaunchState(0, 2), **quiet)
    assert second.calls == ["dog", "vase"]
    results = json.loads(files["json"].read_text())
    assert results["pending"] == [] and results["table"]["solid"]["subjects"] == 3
    assert "Pending" not in files["markdown"].read_text()
    from personalize.cli import main

    files["markdown"].unlink()
    assert main(["eval", "--report-only", "--out", settings.out]) == 0 and files["markdown"].is_file()


def test_eval_commands_answer_help(capsys):
    from personalize.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0 and "--dino-weights" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "eval/dreambench.py", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "DreamBench" in proc.stdout and "--clip-weights" in proc.stdout
    assert main(["eval", "tiny/lora", "--out", "unused"]) == 2  # neither --data nor --toy


def test_detach_from_launcher_forgets_the_process_group(monkeypatch):
    launched = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    for key, value in launched.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    harness.detach_from_launcher(LaunchState(1, 2, 1))
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


# -- the HTML report in a browser -----------------------------------------------------------------

def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    bench = write_bench(tmp_path / "bench", {"dog": "dog"})
    files = run_benchmark(load_dreambench(bench, prompt_indices=[0, 1]), [SolidRow()], [RecordingMetric()],
                          EvalSettings(out=str(tmp_path / "out"), images_per_prompt=2), state=LaunchState(),
                          log=lambda m: None)
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,900", files["html"].resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (900, 1200, 3)
    # the page drew the solid images and the references, not just text on white
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    assert ((image == (0, 90, 200)).all(-1)).sum() > 1000


class ExactJudges:
    """Toy judges that know the answer: attributes of the rendered spec, identity = the pixels."""

    def __init__(self, truth):
        self.truth = truth

    def attributes(self, images):
        return [self.truth[np.ascontiguousarray(im).tobytes()] for im in images]

    def embed(self, images):
        x = torch.tensor(np.stack(images).reshape(len(images), -1), dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=-1)

    def subject_fidelity(self, generated, references):
        return float((self.embed(generated) @ self.embed(references).T).mean())


def test_toy_world_through_the_same_harness(tmp_path):
    from personalize.metrics.toy import ToyJudgeMetrics
    from personalize.toyworld.world import render

    subjects = toy_subjects(["zorbo", "plimm"], tmp_path / "refs", prompt_indices=[0, 9, 14, 18])
    truth = {}
    for s in subjects:
        for p in s.prompts:
            for j in range(2):
                spec = p.toy.spec(s.toy, j)
                truth[render(spec).tobytes()] = {"class": spec.cls, "color": spec.color, "scene": spec.scene,
                                                 "accessory": spec.accessory}
    metric = ToyJudgeMetrics(ExactJudges(truth))
    row = rows.build_row("renders", base="toy")
    files = run_benchmark(subjects, [row], [metric], EvalSettings(out=str(tmp_path / "out"), images_per_prompt=2,
                                                                  title="ToyBench"),
                          state=LaunchState(), log=lambda m: None, data="toy world")
    table = json.loads(files["json"].read_text())["table"]
    assert table["renders"]["mean"]["prompt_fidelity"] == 1.0  # real renders show what each prompt asks
    assert 0 < table["renders"]["mean"]["subject_fidelity"] < 1 and table["real images"]["subjects"] == 2
    assert set(table["renders"]["kinds"]) == set(KINDS)
    assert "| renders |" in files["markdown"].read_text() and "prompt fidelity" in files["markdown"].read_text()
    assert_html_refers_to_existing_files(files["html"])


def test_caption_references_names_the_subject_the_way_each_row_prompts(tmp_path):
    """With settings.caption_references, fine-tune rows train on copies of the references whose caption
    files carry each reference's context with the subject named by the row's words; without, on the
    references themselves with the one instance prompt."""
    from personalize.recipes import load_config

    (subject,) = toy_subjects(["zorbo"], tmp_path / "refs")
    assert rows.instance_caption("a ring on the grass", "ring", "sks ring") == "a sks ring on the grass"
    assert rows.instance_caption("a ringlet on the grass", "ring", "sks ring") == "a sks ring, a ringlet on the grass"
    for recipe, words in (("toy/dreambooth", "sks ring"), ("toy/textual-inversion", "<toy-subject>")):
        row = rows.FineTuneRow(recipe, ["model.base=tiny"])
        work = tmp_path / row.label
        plain = load_config(row.recipe, row.subject_overrides(subject, work / "run", EvalSettings(out=str(tmp_path))))
        assert Path(plain.data.instance_images) == subject.references[0].parent
        settings = EvalSettings(out=str(tmp_path), caption_references=True)
        config = load_config(row.recipe, row.subject_overrides(subject, work / "run", settings))
        folder = Path(config.data.instance_images)
        assert folder.parent == work and config.data.instance_prompt == f"a {words}"
        captions = [(folder / p.name).with_suffix(".txt").read_text().strip() for p in subject.references]
        assert captions == [c.replace("ring", words, 1) for c in subject.captions()]
        assert all(words in c for c in captions) and len(set(captions)) > 1  # contexts differ
        assert [(folder / p.name).read_bytes() for p in subject.references] == [p.read_bytes() for p in subject.references]


# -- results carry the settings they were made with -----------------------------------------------

def _settings_of(results: dict, label: str) -> list[str]:
    """The settings texts of ``label``'s lines of the mean table."""
    return [results["settings"][e["settings"]]["text"] for e in results["table"].values() if e["row"] == label]


def test_rerun_with_other_settings_makes_results_again_and_the_report_says_which(tmp_path, monkeypatch, capsys):
    from personalize.cli import main

    torch.set_num_threads(1)
    bench = write_bench(tmp_path / "bench", {"dog": "dog", "teapot": "teapot"})
    out = tmp_path / "out"

    def argv(*extra):
        return ["eval", "tiny/lora", "base", "--data", str(bench), "--prompts", "0", "-n", "1", "--metrics", "tiny",
                "--set", "train.max_steps=1", "--set", "train.progress_bar=false", "--keep-weights", "--out", str(out),
                *extra]

    def forbidden(*args, **kwargs):
        raise AssertionError("this should not run again")

    def made(label):
        return [json.loads((out / label / s / "result.json").read_text())["made_with"] for s in ("dog", "teapot")]

    results_file = out / "results.json"
    assert main(argv("--steps", "1")) == 0
    assert all(m["row"]["generation"]["steps"] == 1 for m in made("lora") + made("base"))
    capsys.readouterr()

    # --steps 2 over 1-step results: the images are made again (from the kept training), and say so
    monkeypatch.setattr("personalize.training.trainer.Trainer", forbidden)
    assert main(argv("--steps", "2")) == 0
    log = capsys.readouterr().out
    assert log.count("row.generation.steps: 1 -> 2") == 4 and "training finished earlier, reusing" in log
    assert all(m["row"]["generation"]["steps"] == 2 for m in made("lora") + made("base"))
    results = json.loads(results_file.read_text())
    assert list(results["table"]) == ["real images", "lora", "base"]
    texts = _settings_of(results, "lora") + _settings_of(results, "base")
    assert all("; 2 steps;" in t and "1 steps" not in t for t in texts)
    assert "| lora | S2 |" in (out / "report.md").read_text()

    # the same settings again: nothing is made
    monkeypatch.setattr(rows, "generate_images", forbidden)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")}
    assert main(argv("--steps", "2")) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/result.json")} == before
    monkeypatch.undo()

    # a training setting changed: trained again, the earlier training folder (the harness's own) replaced
    capsys.readouterr()
    assert main(argv("--steps", "2", "--set", "train.max_steps=2")) == 0
    log = capsys.readouterr().out
    assert "training again" in log and "train.max_steps: 1 -> 2" in log
    assert json.loads((out / "lora" / "dog" / "result.json").read_text())["stats"]["train_steps"] == 2
    assert all("--steps" not in m and m["row"]["training"]["config"]["train.max_steps"] == 2 for m in made("lora"))
    assert not any("train.max_steps" in k for m in made("base") for k in trees.flatten(m))  # base rows do not train

    # a rerun with --steps 3 stopped after the first subject: the report shows each subject's own settings
    real_evaluate = harness.evaluate_subject

    def stop_at_teapot(row, subject, *args, **kwargs):
        if subject.name == "teapot":
            raise KeyboardInterrupt
        return real_evaluate(row, subject, *args, **kwargs)

    monkeypatch.setattr(harness, "evaluate_subject", stop_at_teapot)
    with pytest.raises(KeyboardInterrupt):
        main(argv("--steps", "3", "--set", "train.max_steps=2"))
    monkeypatch.undo()
    assert main(["eval", "--report-only", "--out", str(out)]) == 0
    results = json.loads(results_file.read_text())
    lines = {label: e for label, e in results["table"].items() if e["row"] == "lora"}
    assert len(lines) == 2 and all(label.startswith("lora [S") for label in lines)  # never one mean for both
    texts = {tuple(results["settings"][e["settings"]]["used_by"]["lora"]): results["settings"][e["settings"]]["text"]
             for e in lines.values()}
    assert "; 3 steps;" in texts[("dog",)] and "; 2 steps;" in texts[("teapot",)]
    assert all(e["subjects"] == 1 for e in lines.values())
    by_subject = {(r[0], r[2]): r[3] for r in next(b for h, _, b in _tables(out) if h == "By subject")}
    assert by_subject[("dog", "lora")] != by_subject[("teapot", "lora")]


def _tables(out: Path):
    from personalize.evaluation import report

    plan, subjects = report.collect(out)
    groups = report.label_settings(plan, subjects)
    return report.tables(plan, subjects, report.summary(plan, subjects), groups)


def test_results_without_a_record_are_reported_as_unrecorded(tmp_path):
    bench = write_bench(tmp_path / "bench", {"dog": "dog"})
    out = tmp_path / "out"
    settings = EvalSettings(out=str(out), images_per_prompt=2)
    run_benchmark(load_dreambench(bench, prompt_indices=[0]), [SolidRow()], [RecordingMetric()], settings,
                  state=LaunchState(), log=lambda m: None)
    result_file = out / "solid" / "dog" / "result.json"
    old = json.loads(result_file.read_text())
    del old["made_with"]  # as an earlier version wrote it
    result_file.write_text(json.dumps(old))
    from personalize.evaluation.report import write_report

    results = json.loads(write_report(out)["json"].read_text())
    assert _settings_of(results, "solid") == ["not recorded (made by an earlier version of personalize eval)"]
    messages = []  # and a rerun makes it again, saying why
    run_benchmark(load_dreambench(bench, prompt_indices=[0]), [SolidRow()], [RecordingMetric()], settings,
                  state=LaunchState(), log=messages.append)
    assert any("not recorded" in m and "making it again" in m for m in messages)
    assert "made_with" in json.loads(result_file.read_text())


# -- the HTML report escapes every field ----------------------------------------------------------

class TagsAndAttributes(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attributes = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes |= {name for name, _ in attrs}


def test_report_html_escapes_every_field(tmp_path):
    from personalize.evaluation.subjects import BenchSubject, EvalPrompt

    script, attribute = "<script>alert(1)</script>", '"><img src=x onerror=alert(2)>'
    hostile = script + attribute
    bench = write_bench(tmp_path / "bench", {"dog": "dog"})
    photos = sorted((bench / "dog").iterdir())
    subject = BenchSubject(f"dog{hostile}", f"dog{hostile}", photos,
                           [EvalPrompt(0, "a {} in " + hostile, "recontextualization")])
    row = SolidRow(label=f"solid{hostile}")
    files = run_benchmark([subject], [row], [RecordingMetric()],
                          EvalSettings(out=str(tmp_path / "out"), images_per_prompt=2, title=f"Bench{hostile}"),
                          state=LaunchState(), log=lambda m: None)
    page = files["html"].read_text()
    parser = TagsAndAttributes()
    parser.feed(page)
    assert "script" not in parser.tags and "onerror" not in parser.attributes
    assert parser.tags.count("img") == 3 + 2  # the 3 references and 2 generated images, nothing injected
    assert script not in page and attribute not in page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img src=x onerror=alert(2)&gt;"
    # the title (twice), the subject name (link and heading), its class (heading, table), the row label (tables,
    # grid), the prompt (grid cell, image titles)
    assert page.count(escaped) >= 10
    assert_html_refers_to_existing_files(files["html"])


def test_a_training_that_finished_before_its_record_was_written_is_reused(tmp_path, monkeypatch, capsys):
    """Killed between the export and train.json: the rerun must not train into the finished folder
    (the trainer refuses it) but reuse it."""
    from personalize.cli import main

    torch.set_num_threads(1)
    bench = write_bench(tmp_path / "bench", {"dog": "dog"})
    out = tmp_path / "out"
    argv = ["eval", "tiny/lora", "--data", str(bench), "--prompts", "0", "-n", "1", "--metrics", "tiny", "--steps", "1",
            "--set", "train.max_steps=1", "--set", "train.progress_bar=false", "--keep-weights", "--out", str(out)]
    assert main(argv) == 0
    record = out / "lora" / "dog" / "train.json"
    stopped = {**json.loads(record.read_text()), "finished": False}
    record.write_text(json.dumps(stopped))
    (out / "lora" / "dog" / "result.json").unlink()
    monkeypatch.setattr("personalize.training.trainer.Trainer", lambda *a, **k: pytest.fail("trained again"))
    capsys.readouterr()
    assert main(argv) == 0
    assert "training finished earlier, reusing" in capsys.readouterr().out
    assert json.loads(record.read_text())["finished"] is True
