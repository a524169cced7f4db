"""Issue 16, files: nothing lost, nothing overwritten, nobody's files unreadable.

Checksummed checkpoints and model folders, overwrite refusal (never a run's own files), file
permissions under the umask, streaming symlink-safe archive extraction, cleaning of what a
killed writer left, one-line errors for malformed files, no credentials in a repr, SAEBench's
remote code off by default. Every CLI refusal is checked for exit code 2, one line naming the
file, and an unchanged folder (sha256 of every file before and after).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import hsae
from hsae import HSAE, HSAEConfig, HSAEError
from hsae.cli import app
from hsae.interop.saelens import MAX_CFG_BYTES
from hsae.io import write_json, write_text
from hsae.runs import Run, RunConfig
from hsae.training import NonFiniteLossError, Trainer
from hsae.training.checkpoint import save_checkpoint
from hsae.training.data import TensorBatches

D_IN = 16
SIZES = [8, 16, 32]
TRAIN = {
    "d_in": D_IN,
    "level_sizes": SIZES,
    "target_l0": 4,
    "train_tokens": 64 * 40,
    "batch_size": 64,
    "update_interval": 10,
    "perturbation_rate": 0.3,
}


# --- helpers -----------------------------------------------------------------------------------


def data(n: int = 4000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(40, D_IN, generator=generator), dim=1)
    return (torch.rand(n, 40, generator=generator) < 0.08).float() @ atoms


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones included) by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def cli(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, *needles: str) -> None:
    """Exit code 2 and one line of output holding every needle."""
    output = result.output.strip()
    assert result.exit_code == 2, result.output
    assert len(output.splitlines()) == 1, output
    for needle in needles:
        assert needle in output, output


def flip_last_byte(path: Path) -> None:
    """One bit flipped in the tensor data (the end of a safetensors file), header intact."""
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def small_model(mode: str = "hsae", seed: int = 0) -> HSAE:
    config = HSAEConfig(d_in=D_IN, level_sizes=SIZES, target_l0=4, mode=mode, seed=seed)
    return HSAE(config)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder as `hsae train` leaves it (random models, no activation shards)."""
    run = Run.create(
        tmp_path / "run",
        RunConfig(model="gpt2", layer=3, hsae={"level_sizes": SIZES, "target_l0": 4}),
    )
    manifest = {
        "format": "hsae-activation-cache",
        "model": {"name": "gpt2", "d_model": D_IN},
        "layer": 3,
        "context_length": 64,
        "dataset": {"spec": "builtin", "kind": "builtin"},
    }
    write_json(run.folder / "activations" / "manifest.json", manifest)
    small_model("hsae").save(run.folder / "hsae")
    small_model("independent", 1).save(run.folder / "baseline")
    write_json(run.folder / "metrics.json", {"hsae": {"levels": []}})
    write_text(run.folder / "summary.md", "# Run\n")
    return run.folder


def trainer_with_checkpoint(folder: Path) -> Trainer:
    trainer = Trainer(HSAEConfig(**TRAIN), TensorBatches(data(), 64, seed=1))
    trainer.initialise()
    while trainer.step < 12 or trainer._replay:
        trainer.train_step()
    save_checkpoint(trainer.state_dict(), folder)
    return trainer


def fresh_trainer() -> Trainer:
    return Trainer(HSAEConfig(**TRAIN), TensorBatches(data(), 64, seed=1))


# --- 1. checksums ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["state.safetensors", "optimizer.safetensors"])
def test_bit_flipped_checkpoint_is_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    trainer_with_checkpoint(tmp_path / "ckpt")
    target = tmp_path / "ckpt" / name
    if not target.exists():  # before the fix Adam's state was optimizer.pt
        target = tmp_path / "ckpt" / "optimizer.pt"
    flip_last_byte(target)
    with pytest.raises(HSAEError, match=f"{target.name} is corrupt"):
        fresh_trainer().resume(tmp_path / "ckpt")


def test_checkpoint_holds_no_pickle_and_resumes_exactly(tmp_path: Path) -> None:
    original = trainer_with_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "optimizer.safetensors",
        "state.safetensors",
        "trainer.json",
    ]
    resumed = fresh_trainer()
    resumed.resume(tmp_path / "ckpt")
    saved, loaded = original.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert json.dumps(saved["param_groups"]) == json.dumps(loaded["param_groups"])
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(value, loaded["state"][index][key]), (index, key)


def old_format_checkpoint(folder: Path) -> Trainer:
    """A checkpoint as hsae wrote it before this issue: optimizer.pt, no checksums."""
    trainer = trainer_with_checkpoint(folder)
    torch.save(trainer.optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "optimizer.safetensors").unlink(missing_ok=True)
    record = json.loads((folder / "trainer.json").read_text())
    for key in ("optimizer", "sha256"):
        record.pop(key, None)
    record["version"] = 1
    (folder / "trainer.json").write_text(json.dumps(record))
    return trainer


def test_checkpoint_of_an_earlier_version_still_resumes(tmp_path: Path) -> None:
    original = old_format_checkpoint(tmp_path / "ckpt")
    resumed = fresh_trainer()
    resumed.resume(tmp_path / "ckpt")
    assert resumed.step == original.step
    for a, b in zip(
        original.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_in_an_old_optimizer_file_is_refused_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    old_format_checkpoint(tmp_path / "ckpt")
    torch.save({"state": {}, "param_groups": [], "x": _Payload()}, tmp_path / "ckpt/optimizer.pt")
    with pytest.raises(HSAEError, match="optimizer.pt is unreadable or unsafe") as caught:
        fresh_trainer().resume(tmp_path / "ckpt")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_missing_tensors_or_record_keys_is_refused_in_one_line(tmp_path: Path) -> None:
    trainer_with_checkpoint(tmp_path / "ckpt")
    state_path = tmp_path / "ckpt" / "state.safetensors"
    tensors = load_file(str(state_path))
    del tensors["generator"], tensors["sparsity.started"]
    save_file(tensors, str(state_path))
    record = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    if "sha256" in record:  # keep the checksum right: this tests the missing keys
        record["sha256"]["state.safetensors"] = hashlib.sha256(state_path.read_bytes()).hexdigest()
    (tmp_path / "ckpt" / "trainer.json").write_text(json.dumps(record))
    with pytest.raises(HSAEError, match="state.safetensors lacks tensors: generator"):
        fresh_trainer().resume(tmp_path / "ckpt")
    del record["scheduler"]
    (tmp_path / "ckpt" / "trainer.json").write_text(json.dumps(record))
    with pytest.raises(HSAEError, match="trainer.json is incomplete: no scheduler"):
        fresh_trainer().resume(tmp_path / "ckpt")


def test_bit_flipped_or_mixed_model_folder_is_refused(tmp_path: Path) -> None:
    small_model().save(tmp_path / "m")
    flip_last_byte(tmp_path / "m" / "hsae.safetensors")
    with pytest.raises(HSAEError, match="hsae.safetensors is corrupt"):
        hsae.load(tmp_path / "m")
    # weights of another save beside this config: the recorded checksum catches the mix
    small_model(seed=3).save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "hsae.safetensors", tmp_path / "m" / "hsae.safetensors")
    with pytest.raises(HSAEError, match="hsae.safetensors is corrupt"):
        hsae.load(tmp_path / "m")


def test_model_folder_without_checksum_still_loads(tmp_path: Path) -> None:
    model = small_model()
    model.save(tmp_path / "m")
    config_path = tmp_path / "m" / "hsae_config.json"
    payload = json.loads(config_path.read_text())
    payload.pop("sha256", None)
    config_path.write_text(json.dumps(payload))
    loaded = hsae.load(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_truncated_weights_or_corrupt_config_are_one_line_errors_naming_the_file(
    tmp_path: Path,
) -> None:
    cases = {
        "hsae.safetensors": lambda p: p.write_bytes(p.read_bytes()[:200]),
        "hsae_config.json": lambda p: p.write_text(p.read_text()[:40]),
    }
    for name, damage in cases.items():
        small_model().save(tmp_path / name)
        damage(tmp_path / name / name)
        with pytest.raises(HSAEError, match=name) as caught:
            hsae.load(tmp_path / name)
        assert "\n" not in str(caught.value)
    # without a recorded checksum the truncated file is caught by the reader
    small_model().save(tmp_path / "old")
    config_path = tmp_path / "old" / "hsae_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"sha256": {}}))
    weights = tmp_path / "old" / "hsae.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(HSAEError, match="hsae.safetensors is not a readable safetensors"):
        hsae.load(tmp_path / "old")


def test_hsae_eval_on_damaged_model_files_exits_2_in_one_line(small_run, tmp_path: Path) -> None:
    for name, damage in {
        "hsae.safetensors": lambda p: p.write_bytes(p.read_bytes()[:300]),
        "hsae_config.json": lambda p: p.write_text('{"config": {"d_in": '),
    }.items():
        run = tmp_path / name / "run"
        shutil.copytree(small_run.folder, run)
        damage(run / "hsae" / name)
        before = digest(run)
        assert_refused(cli("eval", run, "--no-lm"), name)
        assert digest(run) == before


# --- 1b. non-finite losses -----------------------------------------------------------------


def test_nan_loss_names_the_bad_input_batch_and_no_checkpoint_on_the_api() -> None:
    clean = data(64 * 10)

    def batches():
        yield from clean.split(64)
        bad = clean[:64].clone()
        bad[3, 2] = float("inf")
        yield bad

    config = HSAEConfig(**(TRAIN | {"train_tokens": 64 * 40}))
    with pytest.raises(NonFiniteLossError) as caught:
        hsae.train(config, batches(), progress=False)
    message = str(caught.value)
    assert "at step 10" in message and "input batch has 1 of 64 rows with inf/NaN" in message
    assert "checkpoint" not in message


def test_nan_loss_names_the_bad_parameter_and_the_kept_checkpoint(tmp_path: Path) -> None:
    config = HSAEConfig(**(TRAIN | {"train_tokens": 64 * 40}))
    trainer = Trainer(config, TensorBatches(data(), 64, seed=1))
    trainer.fit(progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=5)
    with torch.no_grad():
        trainer.model.levels[1].W_enc[0, 0] = float("nan")
    trainer.config.train_tokens = 64 * 45  # five more steps
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.train_step()
    message = str(caught.value)
    assert "parameter levels.1.W_enc holds inf/NaN" in message
    assert f"checkpoint of step 40 in {tmp_path / 'ckpt'} is kept" in message


# --- 2. overwrites -----------------------------------------------------------------------------


def test_report_never_writes_over_the_runs_own_files(run_dir: Path) -> None:
    before = digest(run_dir)
    for target in ("run.json", "metrics.json", "hsae/hsae_config.json"):
        for extra in ([], ["--overwrite"]):
            result = cli("report", run_dir, "--out", run_dir / target, *extra)
            assert_refused(result, str(run_dir / target), "run's own files")
    assert digest(run_dir) == before


def test_report_refuses_an_existing_out_file(run_dir: Path, tmp_path: Path) -> None:
    page = tmp_path / "mine.html"
    page.write_text("my page")
    assert_refused(cli("report", run_dir, "--out", page), str(page), "--overwrite")
    assert page.read_text() == "my page"


def test_export_archive_refuses_existing_targets_and_run_files(
    run_dir: Path, tmp_path: Path
) -> None:
    before = digest(run_dir)
    for extra in ([], ["--overwrite"]):
        result = cli("export", run_dir, run_dir / "metrics.json", "--format", "archive", *extra)
        assert_refused(result, "metrics.json", "run's own files")
    assert digest(run_dir) == before

    archive = tmp_path / "shared.tar.gz"
    archive.write_bytes(b"someone else's archive")
    assert_refused(cli("export", run_dir, archive, "--format", "archive"), str(archive))
    assert archive.read_bytes() == b"someone else's archive"
    result = cli("export", run_dir, archive, "--format", "archive", "--overwrite")
    assert result.exit_code == 0, result.output
    assert tarfile.is_tarfile(archive)


def test_export_saelens_refuses_a_users_folder_and_the_run_itself(
    run_dir: Path, tmp_path: Path
) -> None:
    users = tmp_path / "my_sae"
    users.mkdir()
    (users / "cfg.json").write_text('{"mine": true}')
    assert_refused(cli("export", run_dir, users), str(users), "--overwrite")
    assert digest(users) == {"cfg.json": hashlib.sha256(b'{"mine": true}').hexdigest()}

    result = cli("export", run_dir, users, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (users / "cfg.json").read_text() == '{"mine": true}'
    assert (users / "hsae" / "level_2" / "cfg.json").is_file()

    before = digest(run_dir)
    assert_refused(cli("export", run_dir, run_dir, "--overwrite"), "run's own files")
    assert_refused(cli("export", run_dir, run_dir / "hsae", "--overwrite"), "run's own files")
    assert digest(run_dir) == before


def test_export_below_a_regular_file_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("notes")
    assert_refused(cli("export", run_dir, blocker / "out"), str(blocker), "is a file")
    result = cli("export", run_dir, blocker / "x.tar.gz", "--format", "archive")
    assert_refused(result, str(blocker), "is a file")
    assert blocker.read_text() == "notes"


def test_import_saelens_refuses_bad_out_and_malformed_cfg(run_dir: Path, tmp_path: Path) -> None:
    exported = tmp_path / "exported"
    assert cli("export", run_dir, exported).exit_code == 0
    levels = [exported / "hsae" / f"level_{i}" for i in range(len(SIZES))]

    a_file = tmp_path / "model.bin"
    a_file.write_text("not a folder")
    assert_refused(cli("import-saelens", *levels, "--out", a_file), str(a_file), "is a file")
    assert a_file.read_text() == "not a folder"

    before = digest(run_dir)
    result = cli("import-saelens", *levels, "--out", run_dir / "hsae", "--overwrite")
    assert_refused(result, "run's own files")
    assert digest(run_dir) == before

    deep = tmp_path / "deep"
    shutil.copytree(levels[0], deep)
    (deep / "cfg.json").write_text("[" * 200_000 + "]" * 200_000)
    huge = tmp_path / "huge"
    shutil.copytree(levels[0], huge)
    (huge / "cfg.json").write_text('{"pad": "' + "x" * MAX_CFG_BYTES + '"}')
    for folder, reason in ((deep, "nested too deeply"), (huge, "larger than")):
        before = digest(folder)
        result = cli("import-saelens", folder, "--out", tmp_path / "m")
        assert_refused(result, str(folder / "cfg.json"), reason)
        assert digest(folder) == before and not (tmp_path / "m").exists()

    out = tmp_path / "imported"
    assert cli("import-saelens", *levels, "--out", out).exit_code == 0
    first = digest(out)
    assert_refused(cli("import-saelens", *levels, "--out", out), "already holds a saved model")
    assert digest(out) == first
    assert cli("import-saelens", *levels, "--out", out, "--overwrite").exit_code == 0


# --- 4. permissions ----------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(run_dir: Path, tmp_path: Path, mask: int) -> None:
    with umask(mask):
        write_json(tmp_path / "m.json", {})
        archive = tmp_path / "run.tar.gz"
        assert cli("export", run_dir, archive, "--format", "archive").exit_code == 0
        assert cli("export", run_dir, tmp_path / "saes").exit_code == 0
        small_model().save(tmp_path / "model")
    expected = 0o666 & ~mask
    for path in (
        tmp_path / "m.json",
        archive,
        tmp_path / "saes" / "hsae" / "forest.json",
        tmp_path / "model" / "hsae.safetensors",
    ):
        assert path.stat().st_mode & 0o777 == expected, path
    assert (tmp_path / "saes").stat().st_mode & 0o777 == 0o777 & ~mask


def test_extracted_members_keep_their_modes_within_the_umask(run_dir: Path, tmp_path: Path) -> None:
    from hsae.interop.archive import export_archive, extract_archive

    archive = export_archive(run_dir, tmp_path / "run.tar.gz")
    repacked = tmp_path / "modes.tar.gz"
    with tarfile.open(archive) as source, tarfile.open(repacked, "w:gz") as target:
        for member in source.getmembers():
            payload = source.extractfile(member).read()
            member.mode = 0o755 if member.name.endswith("summary.md") else 0o644
            target.addfile(member, io.BytesIO(payload))
    with umask(0o027):
        root = extract_archive(repacked, tmp_path / "dest")
    assert (root / "summary.md").stat().st_mode & 0o777 == 0o750
    assert (root / "hsae" / "hsae.safetensors").stat().st_mode & 0o777 == 0o640
    assert (root / "hsae").stat().st_mode & 0o777 == 0o750


# --- 5. archive extraction ---------------------------------------------------------------------


def test_extraction_streams_members_instead_of_reading_them_into_memory(
    run_dir: Path, tmp_path: Path
) -> None:
    from hsae.interop.archive import export_archive, extract_archive

    size = 48 << 20
    (run_dir / "plots").mkdir()
    with open(run_dir / "plots" / "big.bin", "wb") as handle:
        handle.truncate(size)  # zeros: compresses to almost nothing
    archive = export_archive(run_dir, tmp_path / "run.tar.gz")
    tracemalloc.start()
    try:
        root = extract_archive(archive, tmp_path / "dest")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (root / "plots" / "big.bin").stat().st_size == size
    assert peak < 8 << 20, f"peak Python memory {peak / 2**20:.1f} MiB for a 48 MiB member"


def test_extraction_refuses_a_symlinked_destination(run_dir: Path, tmp_path: Path) -> None:
    from hsae.interop.archive import export_archive, extract_archive

    archive = export_archive(run_dir, tmp_path / "run.tar.gz")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "run").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(HSAEError, match="symbolic link"):
        extract_archive(archive, dest)
    assert list(elsewhere.iterdir()) == []
    linked_dest = tmp_path / "linked"
    linked_dest.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(HSAEError, match="symbolic link"):
        extract_archive(archive, linked_dest)
    assert list(elsewhere.iterdir()) == []


def test_failed_extraction_leaves_nothing_behind(run_dir: Path, tmp_path: Path) -> None:
    from hsae.interop.archive import export_archive, extract_archive

    archive = export_archive(run_dir, tmp_path / "run.tar.gz")
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(tampered, "w:gz") as tar:
        for member, payload in members:  # last member's bytes changed, same size
            if member is members[-1][0]:
                payload = bytes([payload[0] ^ 1]) + payload[1:]
            tar.addfile(member, io.BytesIO(payload))
    (tmp_path / "dest").mkdir()
    with pytest.raises(HSAEError, match="is corrupt"):
        extract_archive(tampered, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []  # no run folder, no staging folder


# --- 8. leftovers ------------------------------------------------------------------------------

DIE_WHILE_WRITING = """
import os, sys
from hsae.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half written")
    print(tmp.name, flush=True)
    if len(sys.argv) > 2:
        sys.stdin.read()  # stay alive until killed
    os._exit(0)
"""


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".partial")))


def test_temporaries_of_killed_writers_are_cleaned_by_the_next_write(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    subprocess.run([sys.executable, "-c", DIE_WHILE_WRITING, str(folder / "a.json")], check=True)
    assert len(_temporaries(folder)) == 1
    write_json(folder / "b.json", {})  # first write of this process into the folder
    assert _temporaries(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == ["b.json"]


def test_cleaning_spares_live_writers_and_recent_unknown_files(tmp_path: Path) -> None:
    from hsae.io import clean_stale_temporaries

    folder = tmp_path / "out"
    folder.mkdir()
    live = subprocess.Popen(
        [sys.executable, "-c", DIE_WHILE_WRITING, str(folder / "a.json"), "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        live_name = live.stdout.readline().strip()
        (folder / "c.json").write_text("{}")
        unknown = folder / ".c.json.abcdefgh.tmp"  # an older hsae's mkstemp name beside c.json
        users = folder / ".notes.abcdefgh.tmp"  # looks alike, but nothing named notes: a user's
        for path in (unknown, users):
            path.write_text("x")
        clean_stale_temporaries(folder, force=True)
        assert _temporaries(folder) == sorted([live_name, unknown.name, users.name])
        two_hours_ago = time.time() - 7200
        for path in (unknown, users):
            os.utime(path, (two_hours_ago, two_hours_ago))
        clean_stale_temporaries(folder, force=True)
        assert _temporaries(folder) == sorted([live_name, users.name])
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    clean_stale_temporaries(folder, force=True)
    assert _temporaries(folder) == [users.name]


DIE_DURING_EXPORT = """
import os, sys
import hsae.interop.saelens as saelens
original = saelens.export_model_saelens
def dying(model, out, provenance, which="hsae"):
    if which == "baseline":
        os._exit(1)  # killed after the HSAE's levels were written
    return original(model, out, provenance, which)
saelens.export_model_saelens = dying
saelens.export_saelens(sys.argv[1], sys.argv[2])
"""


def test_killed_saelens_export_leaves_no_folder_that_looks_complete(
    run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exports" / "saes"
    killed = subprocess.run([sys.executable, "-c", DIE_DURING_EXPORT, str(run_dir), str(out)])
    assert killed.returncode == 1
    assert not out.exists()
    from hsae.interop.saelens import export_saelens

    export_saelens(run_dir, out)
    assert (out / "baseline" / "forest.json").is_file()
    assert _temporaries(tmp_path / "exports") == []


# --- 12. credentials and remote code -----------------------------------------------------------


def test_judge_settings_repr_hides_credentials() -> None:
    from hsae.evaluation.llm import JudgeClient, JudgeSettings

    settings = JudgeSettings(
        base_url="https://bob:hunter2@judge.example/v1?api-key=sk-query-secret",
        model="m",
        api_key="sk-header-secret",
    )
    for text in (repr(settings), str(settings), repr(JudgeClient(settings))):
        assert "hunter2" not in text and "secret" not in text and "bob" not in text
        assert "judge.example/v1" in text


def test_saebench_remote_code_is_opt_in(run_dir: Path) -> None:
    from hsae.interop.saebench import saebench_saes

    assert not any(sae.cfg.dataset_trust_remote_code for _, sae in saebench_saes(run_dir))
    trusted = saebench_saes(run_dir, levels=[0], trust_remote_code=True)
    assert all(sae.cfg.dataset_trust_remote_code for _, sae in trusted)
    assert "--trust-remote-code" in cli("saebench", "--help").output
