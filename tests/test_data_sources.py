"""Calibration data as users have it: JSONL with absolute paths, LLaVA JSON lists, Hugging Face
datasets on disk (save_to_disk, parquet, arrow); every bad record is one error line naming it.

The same three image+question+answer records are written in each form; every form must give the
samples (token ids, pixels, roles) of a JSONL naming the images by absolute path, and through
the command line the very checkpoint that JSONL gives.
"""

import json
import shutil

import datasets
import pytest
import torch
from PIL import Image

from tlq_vllm.calibrate.cli import main
from tlq_vllm.calibrate.data import DataError, Fields, InlineImage, build_sample, chosen_indices, load_records

QUESTIONS = ["What shape is in the image?", "What color is the shape?", "Is there a circle?"]
ANSWERS = ["circle", "blue", "no"]
FORMS = ["jsonl-absolute-paths", "llava-json", "save-to-disk", "parquet-named-columns", "arrow-file"]
# SmoothQuant + RTN: the cheapest method whose weights depend on every token of every sample.
CLI = ["--model", "fixture:qwen2-vl", "--method", "smoothquant", "--scheme", "W8A8", "--num-samples", "3",
       "--no-progress"]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three easy-vqa PNGs in their own directory, away from every data file."""
    import easy_vqa

    folder = tmp_path_factory.mktemp("images")
    sources = list(easy_vqa.get_train_image_paths().values())[:3]
    return [shutil.copy(src, folder / f"img{i}.png") for i, src in enumerate(sources)]


@pytest.fixture(scope="module")
def forms(tmp_path_factory, images):
    """The same three records in each form: form -> (--data, the other flags it needs)."""
    root = tmp_path_factory.mktemp("forms")
    triples = list(zip(images, QUESTIONS, ANSWERS, strict=True))
    jsonl = write_jsonl(root / "data" / "calib.jsonl",
                        [{"image": str(p), "question": q, "answer": a} for p, q, a in triples])
    llava = root / "llava" / "llava_mix.json"
    llava.parent.mkdir()
    llava.write_text(json.dumps([
        {"id": f"{i:06d}", "image": p.name,
         "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
        for i, (p, q, a) in enumerate(triples)
    ], indent=1))
    pil = [Image.open(p).convert("RGB") for p in images]  # no file behind them: datasets stores PNG bytes
    datasets.Dataset.from_dict({"image": pil, "question": QUESTIONS, "answers": [[a] for a in ANSWERS]}).save_to_disk(
        str(root / "ds"))
    named = datasets.Features(
        {"picture": datasets.Image(), "instruction": datasets.Value("string"), "response": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"picture": [{"bytes": p.read_bytes(), "path": p.name} for p in images], "instruction": QUESTIONS,
         "response": ANSWERS}, features=named,
    ).to_parquet(str(root / "calib.parquet"))
    columns = ["--image-column", "picture", "--question-column", "instruction", "--answer-column", "response"]
    return {
        "jsonl-absolute-paths": (jsonl, []),
        "llava-json": (llava, ["--image-root", str(images[0].parent)]),
        "save-to-disk": (root / "ds", []),
        "parquet-named-columns": (root / "calib.parquet", columns),
        "arrow-file": (next((root / "ds").glob("*.arrow")), []),
    }


def records_of(data, flags):
    """load_records as the CLI calls it for these flags."""
    options = dict(zip(flags[::2], flags[1::2], strict=True))
    fields = Fields(options.get("--image-column"), options.get("--question-column"), options.get("--answer-column"))
    return load_records(str(data), num_samples=3, seed=0, image_root=options.get("--image-root"), fields=fields)


@pytest.mark.parametrize("form", FORMS[1:])
def test_every_form_gives_the_samples_of_the_jsonl(forms, form):
    from transformers import AutoProcessor

    from tlq_vllm.testing import build_fixture

    model_dir = build_fixture("qwen2-vl")
    processor = AutoProcessor.from_pretrained(model_dir)
    image_token_id = json.loads((model_dir / "config.json").read_text())["image_token_id"]
    expected, got = (records_of(*forms[name]) for name in ("jsonl-absolute-paths", form))
    assert [(r.prompt, r.answer) for r in got] == [(r.prompt, r.answer) for r in expected]
    if form in ("save-to-disk", "parquet-named-columns", "arrow-file"):  # the dataset holds the images
        assert all(isinstance(image, InlineImage) for r in got for image in r.images)
    for a, b in zip(expected, got, strict=True):
        sa, sb = (build_sample(r, processor, image_token_id, max_pixels=None) for r in (a, b))
        assert sa.inputs.keys() == sb.inputs.keys()
        assert all(torch.equal(sa.inputs[k], sb.inputs[k]) for k in sa.inputs), b.source
        assert torch.equal(sa.roles, sb.roles)


@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory, forms):
    out = tmp_path_factory.mktemp("reference") / "out"
    data, _ = forms["jsonl-absolute-paths"]
    assert main([*CLI, "--data", str(data), "--output", str(out)]) == 0
    return (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("form", ["llava-json", "save-to-disk", "parquet-named-columns"])  # arrow: as save-to-disk
def test_every_form_calibrates_to_the_checkpoint_of_the_jsonl(tmp_path, forms, reference_weights, form):
    data, flags = forms[form]
    out = tmp_path / "out"
    assert main([*CLI, "--data", str(data), *flags, "--output", str(out)]) == 0
    provenance = json.loads((out / "tlq_provenance.json").read_text())
    assert provenance["calibration_set"]["source"] == str(data)
    assert provenance["options"]["image_root"] == dict(zip(flags[::2], flags[1::2], strict=True)).get("--image-root")
    assert (out / "model.safetensors").read_bytes() == reference_weights


def test_arrow_files_and_dataset_dicts_read_like_the_save_to_disk_directory(tmp_path, images):
    rows = {"images": [[str(p)] for p in images], "query": QUESTIONS, "caption": ANSWERS}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    from_dict = load_records(str(tmp_path / "dd"), num_samples=3, seed=1)
    arrow = next((tmp_path / "dd" / "train").glob("*.arrow"))
    from_arrow = load_records(str(arrow), num_samples=3, seed=1)
    assert [(r.images, r.prompt, r.answer) for r in from_dict] == [(r.images, r.prompt, r.answer) for r in from_arrow]
    assert sorted(r.prompt for r in from_dict) == sorted(QUESTIONS)
    by_prompt = {r.prompt: r for r in from_dict}
    assert by_prompt[QUESTIONS[1]].answer == ANSWERS[1] and by_prompt[QUESTIONS[1]].images == [images[1]]
    assert from_dict[0].source.startswith(f"{tmp_path / 'dd'}[")


def test_relative_paths_resolve_against_the_data_file_or_the_image_root(tmp_path, images):
    beside = write_jsonl(images[0].parent / "beside.jsonl", [{"image": images[0].name, "question": "q"}])
    assert load_records(str(beside), num_samples=1, seed=0)[0].images == [images[0]]
    apart = write_jsonl(tmp_path / "data" / "calib.jsonl", [{"image": "sub/../" + images[1].name, "question": "q"}])
    assert load_records(str(apart), num_samples=1, seed=0, image_root=str(images[0].parent))[0].images == [images[1]]
    with pytest.raises(DataError, match=r"calib\.jsonl:1: image 'sub/../img1\.png' not found"):
        load_records(str(apart), num_samples=1, seed=0)


def test_only_the_chosen_rows_of_a_dataset_are_read(tmp_path, images):
    """A 600k-row dataset is indexed, not parsed: a bad row that is not chosen is never looked at."""
    cells = [str(images[0]), str(tmp_path / "gone.png")]
    datasets.Dataset.from_dict({"image": cells, "prompt": ["fine", "missing image"]}).save_to_disk(str(tmp_path / "ds"))
    seed = next(s for s in range(100) if chosen_indices(2, 1, s, "") == [0])
    (record,) = load_records(str(tmp_path / "ds"), num_samples=1, seed=seed)
    assert (record.prompt, record.answer, record.images) == ("fine", None, [images[0]])
    with pytest.raises(DataError, match=r"ds\[1\]: image '.*gone.png' not found"):
        load_records(str(tmp_path / "ds"), num_samples=2, seed=seed)


def cli_error(capsys, tmp_path, data, *extra):
    """Runs the calibrator's CLI on bad data: one error line, exit 2, no output, no staging."""
    out = tmp_path / "out"
    argv = ["--model", "fixture:qwen2-vl", "--method", "gptq", "--num-samples", "1", "--no-progress",
            "--output", str(out), "--data", str(data), *extra]
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]) and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "staging" in p.name]
    return errors[0]


def test_a_named_column_that_is_missing_names_the_dataset_and_its_columns(tmp_path, capsys, images):
    datasets.Dataset.from_dict({"image": [str(images[0])], "question": ["q"]}).to_parquet(str(tmp_path / "d.parquet"))
    line = cli_error(capsys, tmp_path, tmp_path / "d.parquet", "--answer-column", "label")
    assert f"{tmp_path / 'd.parquet'}: no column 'label' (--answer-column); its columns are image, question" in line


def test_no_image_column_found_says_which_flag_names_it(tmp_path, capsys, images):
    datasets.Dataset.from_dict({"photo": [str(images[0])], "question": ["q"]}).save_to_disk(str(tmp_path / "ds"))
    line = cli_error(capsys, tmp_path, tmp_path / "ds")
    assert "no image column (looked for image, images); name it with --image-column" in line


def test_an_undecodable_image_names_the_record(tmp_path, capsys, images):
    cells = [{"bytes": images[0].read_bytes(), "path": "good.png"}, {"bytes": b"not an image", "path": "bad.png"}]
    dataset = datasets.Dataset.from_dict({"image": cells, "question": ["q0", "q1"], "answer": ["a", "b"],
                                          "id": ["good-one", "bad-one"]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    line = cli_error(capsys, tmp_path, tmp_path / "ds", "--num-samples", "2")
    assert f"{tmp_path / 'ds'}[1] (id bad-one): cannot read image bytes (bad.png)" in line


@pytest.mark.parametrize("form", ["jsonl", "llava-json", "dataset"])
def test_a_missing_image_file_names_the_record(tmp_path, capsys, form):
    missing = tmp_path / "nowhere" / "gone.png"
    if form == "jsonl":
        data = write_jsonl(tmp_path / "calib.jsonl", [{"image": str(missing), "question": "q"}])
        where = f"{data}:1"
    elif form == "llava-json":
        data = tmp_path / "calib.json"
        data.write_text(json.dumps([{"id": 7, "image": "gone.png", "conversations": [{"from": "user", "value": "q"}]}]))
        where = f"{data}[0] (id 7)"
    else:
        data = tmp_path / "ds"
        datasets.Dataset.from_dict({"image": ["gone.png"], "question": ["q"]}).save_to_disk(str(data))
        where = f"{data}[0]"
    line = cli_error(capsys, tmp_path, data, *(["--image-root", str(tmp_path)] if form == "llava-json" else []))
    assert f"{where}: image " in line and "not found" in line, line


def test_json_that_is_not_a_list_of_records_is_refused(tmp_path, capsys):
    data = tmp_path / "calib.json"
    data.write_text('{"image": "a.png", "question": "q"}\n{"image": "b.png", "question": "q"}\n')
    assert "name the file .jsonl" in cli_error(capsys, tmp_path, data)
    data.write_text('{"image": "a.png", "question": "q"}')
    assert "expected a JSON list of records, got a JSON dict" in cli_error(capsys, tmp_path, data)


def test_column_options_do_not_apply_to_easy_vqa(tmp_path, capsys):
    assert "not to the built-in easy-vqa" in cli_error(capsys, tmp_path, "easy-vqa", "--image-column", "img")
