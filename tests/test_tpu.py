"""launcher=tpu (experiments/tpu.py): SkyPilot managed jobs on Cloud TPU slices, checked offline.

SkyPilot's own loader validates the task YAML we generate (when a SkyPilot environment is at
hand: ``SKYPILOT_PYTHON`` or a ``sky`` on PATH); bash runs the generated run script with a
stand-in for the project's Python, to show that the trainer's exit status 75 reaches SkyPilot's
``recover_on_exit_codes``; real git shows that the launched commit, not the working tree, ships;
a stand-in ``sky`` command (only the cloud engine is faked) and the GCS emulator show what a launch
submits, skips and writes.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml

from core import cli
from core.errors import EXIT_PREEMPTED, UserError
from core.io import rundir, storage
from experiments import registry, run, tpu
from tables import runs as table_runs

U_NETS = ["None", "DWT-1", "DWT-2"]   # three Table 5 jobs (512x512 U-Nets)
U_VIT = ["256x256/simple diffusion (U-ViT 2B)"]   # a Table 7 job


def _opts(*argv):
  opts, _ = cli.parse(["table=5", "scale=paper", "launcher=tpu",
                       "data_dir=gs://b/imagenet{res}", *argv], run.OPTIONS, prog="t",
                      description="t")
  return opts


def _jobs(table="5", rows=U_NETS):
  return registry.jobs(registry.select(table, rows))


def _git_repo(path, files):
  os.makedirs(path)
  for name, text in files.items():
    with open(os.path.join(path, name), "w") as f:
      f.write(text)
  env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
         "GIT_COMMITTER_EMAIL": "t@t"}
  for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "one"]):
    subprocess.run(["git", "-C", str(path), *args], check=True, env=env)
  return str(path)


def _dry_run_yamls(capsys, job_list, opts, repo):
  tpu.launch(job_list, "paper", "gs://bucket/sd", {**opts, "dry_run": True}, repo=repo)
  out, err = capsys.readouterr()
  blocks = out.split("# ---- ")[1:]
  texts = {}
  for block in blocks:
    path, body = block.split("\n", 1)
    yaml_text, command = body.rsplit("sky jobs launch", 1)
    texts[os.path.basename(path)] = yaml_text
    assert command.split()[-1] == path   # the command launches the file it names
  return texts, err


# ------------------------------------------------------------------------------------------------
# SkyPilot's own loader (its JSON schemas and Task/Resources construction), in its environment.


def _skypilot_python():
  if os.environ.get("SKYPILOT_PYTHON"):
    return os.environ["SKYPILOT_PYTHON"]
  sky = shutil.which("sky")
  if sky:
    with open(sky) as f:
      first = f.readline()
    if first.startswith("#!") and "python" in first:
      return first[2:].strip().split()[0]
  return None


VALIDATE = """
import json, sys
import sky
out = []
for path in sys.argv[1:]:
  try:
    t = sky.Task.from_yaml(path)
  except Exception as e:  # the loader's verdict, reported to the test
    out.append({"path": path, "error": f"{type(e).__name__}: {e}"})
    continue
  (r,) = list(t.resources)
  out.append({"path": path, "name": t.name, "workdir": t.workdir, "accelerators": r.accelerators,
              "accelerator_args": r.accelerator_args, "region": r.region, "zone": r.zone,
              "use_spot": r.use_spot, "job_recovery": r.job_recovery, "envs": t.envs,
              "setup": t.setup, "run": t.run, "num_nodes": t.num_nodes})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def skypilot_python(tmp_path_factory):
  """SkyPilot's own Python: SKYPILOT_PYTHON, a ``sky`` on PATH, or else a venv the pinned SkyPilot
  is installed into from the package registry (about 40 s and 0.6 GB, removed with pytest's
  temporary directories). Skipped, saying why, where pip cannot install it; on CI a failure."""
  found = _skypilot_python()
  if found:
    return found
  venv = tmp_path_factory.mktemp("skypilot") / "venv"
  python = str(venv / "bin" / "python")
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  p = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", tpu.SKYPILOT],
                     capture_output=True, text=True, timeout=1200)
  if p.returncode:
    why = f"could not install {tpu.SKYPILOT}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    if os.environ.get("CI") == "true":
      pytest.fail(why)
    pytest.skip(why)
  return python


@pytest.mark.slow
def test_skypilot_loads_the_generated_tasks_and_rejects_a_broken_one(skypilot_python, tmp_path, capsys):
  repo = _git_repo(tmp_path / "repo", {"a.txt": "v1\n"})
  files = []
  for job_list, argv in ((_jobs(), []),
                         (_jobs("7", U_VIT), ["tpu_spot=true", "repo_url=https://x/sd.git"])):
    texts, _ = _dry_run_yamls(capsys, job_list, _opts(*argv), repo)
    for name, text in texts.items():
      (tmp_path / name).write_text(text)
      files.append(str(tmp_path / name))
  broken = yaml.safe_load((tmp_path / os.path.basename(files[0])).read_text())
  broken["resources"]["job_recovery"]["recover_on_exit_codes"] = [EXIT_PREEMPTED, 300]
  (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
  env = {**os.environ, "HOME": str(tmp_path / "home"), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
  p = subprocess.run([skypilot_python, "-c", VALIDATE, *files, str(tmp_path / "broken.yaml")],
                     capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  *tasks, bad = json.loads(p.stdout.strip().splitlines()[-1])
  assert "300" in bad["error"] and "recover_on_exit_codes" in bad["error"], bad
  assert len(tasks) == 4 and not any("error" in t for t in tasks), tasks
  sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                       check=True).stdout.strip()
  for t in tasks:
    assert t["job_recovery"]["recover_on_exit_codes"] == [EXIT_PREEMPTED] == [75]
    assert t["job_recovery"]["max_restarts_on_errors"] == tpu.MAX_RESTARTS_ON_ERRORS
    assert t["num_nodes"] == 1 and t["envs"]["SD_COMMIT"] == sha
    assert f"jax[tpu]=={tpu.JAX_VERSION}" in t["setup"]
    assert "core.train" in t["run"] and "eval.worker" in t["run"]
  unets, (uvit,) = tasks[:3], tasks[3:]
  for t in unets:   # the paper's 32 TPUv2 chips -> 32 v4 chips, in the zone that offers v4
    assert t["accelerators"] == {"tpu-v4-64": 1} and t["zone"] == "us-central2-b"
    assert t["region"] == "us-central2" and not t["use_spot"]
    assert t["accelerator_args"]["runtime_version"] == "tpu-ubuntu2204-base"
    assert t["workdir"] == os.path.join(os.path.abspath(tpu.STAGE_DIR), sha[:12])
  assert uvit["accelerators"] == {"tpu-v4-256": 1} and uvit["use_spot"]
  assert uvit["workdir"] == {"url": "https://x/sd.git", "ref": sha}


# ------------------------------------------------------------------------------------------------
# The generated scripts under bash.

FAKE_PYTHON = """#!/bin/bash
echo "$*" >> "$CALLS"
case "$2" in
  core.train) exit "$TRAIN_RC";;
  eval.worker) exit "$EVAL_RC";;
esac
exit 99
"""


@pytest.mark.parametrize("train_rc, eval_rc, want_rc, evaluated", [
    (0, 0, 0, True),
    (EXIT_PREEMPTED, 0, EXIT_PREEMPTED, False),   # preempted: SkyPilot relaunches on 75
    (1, 0, 1, False),
    (0, 3, 3, True),
])
def test_run_script_trains_then_evaluates_and_passes_the_exit_status_on(
    tmp_path, train_rc, eval_rc, want_rc, evaluated):
  (job,) = _jobs("7", U_VIT)
  config = tpu.task(job, ["gin_file=x.gin", "Train.data_dir='gs://b/d'", "workdir=gs://b/sd/r"],
                    ["workdir=gs://b/sd/r", "num_samples=8"], _opts(), commit="abc", code="/x")
  (tmp_path / ".venv" / "bin").mkdir(parents=True)
  fake = tmp_path / ".venv" / "bin" / "python"
  fake.write_text(FAKE_PYTHON)
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  calls = tmp_path / "calls"
  env = {**os.environ, "CALLS": str(calls), "TRAIN_RC": str(train_rc), "EVAL_RC": str(eval_rc),
         **config["envs"]}
  p = subprocess.run(["bash", "-c", config["run"]], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=60)
  assert p.returncode == want_rc, p.stderr
  lines = calls.read_text().splitlines()
  assert lines[0] == ("-m core.train gin_file=x.gin Train.data_dir='gs://b/d' workdir=gs://b/sd/r "
                      "mesh.fsdp=-1 distributed=true")
  if evaluated:
    assert lines[1:] == ["-m eval.worker workdir=gs://b/sd/r num_samples=8 distributed=true"]
  else:
    assert lines[1:] == []
  assert config["resources"]["job_recovery"]["recover_on_exit_codes"] == [EXIT_PREEMPTED]


def test_eval_false_trains_only(capsys, tmp_path):
  repo = _git_repo(tmp_path / "repo", {"a.txt": "v1\n"})
  (with_eval,) = _dry_run_yamls(capsys, _jobs("7", U_VIT), _opts(), repo)[0].values()
  (without,) = _dry_run_yamls(capsys, _jobs("7", U_VIT), _opts("eval=false"), repo)[0].values()
  assert "eval.worker" in with_eval and "core.train" in without and "eval.worker" not in without


def test_setup_pins_this_jax_and_python_and_stops_at_the_first_failure(tmp_path):
  script = tpu.setup_script()
  assert f"'jax[tpu]=={version('jax')}'" in script and tpu.JAX_VERSION == version("jax")
  assert f"--python {sys.version_info.major}.{sys.version_info.minor} .venv" in script
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("python3", "bash"):   # pip of uv fails here: nothing after it may run
    (bin_dir / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {tmp_path}/calls\n"
                                f"exit {7 if name == 'python3' else 0}\n")
    (bin_dir / name).chmod(0o755)
  p = subprocess.run([shutil.which("bash"), "-c", script], cwd=tmp_path, capture_output=True,
                     env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, timeout=60)
  assert p.returncode == 7
  assert (tmp_path / "calls").read_text().splitlines() == [
      f"python3 -m pip install -q --user {tpu.UV}"]


# ------------------------------------------------------------------------------------------------
# Slices and zones.


def test_default_slices_exist_and_the_papers_v2_64_is_refused():
  assert tpu.slice_for("unet", {}) == ("v4-64", "us-central2-b")
  assert tpu.slice_for("uvit", {}) == ("v4-256", "us-central2-b")
  assert tpu.slice_for("unet", {"tpu_type": "v6e-64"}) == ("v6e-64", "us-east5-b")
  assert tpu.slice_for("unet", {"tpu_type": "v5p-128", "tpu_zone": "us-central1-a"}) == \
      ("v5p-128", "us-central1-a")
  assert tpu.slice_for("unet", {"tpu_type": "v2-128"}) == ("v2-128", "us-central1-a")
  with pytest.raises(UserError, match=r"offers no v2-64 \(v2 slices: v2-8, v2-32, v2-128"):
    tpu.slice_for("unet", {"tpu_type": "v2-64"})
  with pytest.raises(UserError, match="unknown TPU type 'v9-8'"):
    tpu.slice_for("unet", {"tpu_type": "v9-8"})


def test_plan_names_the_default_slice_and_its_cost(capsys):
  assert run.main(["table=5", "scale=paper", "launcher=tpu", "mode=plan", "format=json",
                   "row=DWT-2"]) == 0
  (p,) = json.loads(capsys.readouterr().out)
  assert p["target"] == "TPU v4-64" and p["chips"] == 32 and p["devices"] == 32
  assert p["cost_unit"] == "TPU chip-hours" and p["total_cost"] > 0 and p["fits"]


# ------------------------------------------------------------------------------------------------
# What ships: the launched commit.


def test_the_launched_commit_ships_not_the_working_tree(tmp_path, capsys):
  repo = _git_repo(tmp_path / "repo", {"a.txt": "v1\n", "b.txt": "b\n"})
  (tmp_path / "repo" / "a.txt").write_text("v2, not committed\n")
  (tmp_path / "repo" / "untracked.txt").write_text("never shipped\n")
  sha, dirty = tpu.commit_of(repo)
  assert dirty == ["a.txt"] and len(sha) == 40
  dest = tpu.ship(repo, sha, str(tmp_path / "shipped"))
  assert sorted(os.listdir(dest)) == [".complete", "a.txt", "b.txt"]
  assert (tmp_path / "shipped" / "a.txt").read_text() == "v1\n"
  assert (tmp_path / "shipped" / ".complete").read_text() == sha + "\n"
  # A launch refuses the dirty tree, naming the file; a dry run says what would and would not ship.
  with pytest.raises(UserError, match=rf"ships commit {sha[:12]} and 1 tracked file\(s\) differ "
                                      rf"from it \(a.txt\): commit or stash"):
    tpu.launch(_jobs(), "paper", "gs://bucket/sd", _opts(), repo=repo)
  _, err = _dry_run_yamls(capsys, _jobs(), _opts(), repo)
  assert f"uploads commit {sha[:12]}; 1 tracked file(s) with uncommitted changes would not " \
         f"ship" in err


# ------------------------------------------------------------------------------------------------
# A launch against a stand-in `sky` (the cloud engine) and the GCS emulator (the run directories).

FAKE_SKY = """#!{python}
import json, os, shutil, sys
state = os.environ["FAKE_SKY"]
args = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\\n")
if args[:2] == ["jobs", "queue"]:
  print(open(os.path.join(state, "queue.json")).read())
elif args[:2] == ["jobs", "launch"]:
  name = args[args.index("--name") + 1]
  shutil.copy(args[-1], os.path.join(state, name + ".yaml"))
  sys.exit(json.load(open(os.path.join(state, "fail.json"))).get(name, 0))
"""


def test_a_launch_submits_skips_active_jobs_writes_job_json_and_names_failures(
    tmp_path, capsys, monkeypatch, gcs_bucket):
  repo = _git_repo(tmp_path / "repo", {"a.txt": "v1\n"})
  monkeypatch.chdir(tmp_path)
  state = tmp_path / "sky"
  state.mkdir()
  sky = state / "sky"
  sky.write_text(FAKE_SKY.format(python=sys.executable))
  sky.chmod(0o755)
  monkeypatch.setenv("FAKE_SKY", str(state))
  none, dwt1, dwt2 = (tpu.task_name(j) for j in _jobs())
  (state / "queue.json").write_text(json.dumps([
      {"job_id": 3, "job_name": none, "status": "RUNNING"},
      {"job_id": 1, "job_name": dwt1, "status": "RUNNING"},   # older than job 4
      {"job_id": 4, "job_name": dwt1, "status": "FAILED_NO_RESOURCE",
       "failure_reason": "Resources unavailable"}]))
  (state / "fail.json").write_text(json.dumps({dwt2: 1}))
  with pytest.raises(UserError, match=rf"sky jobs launch failed: {dwt2} \(exit status 1\)"):
    tpu.launch(_jobs(), "paper", gcs_bucket, _opts(f"sky={sky}"), repo=repo)
  out = capsys.readouterr().out
  assert f"managed job 3 ({none}) is RUNNING: not launched again" in out
  assert "ended FAILED_NO_RESOURCE: Resources unavailable; launching again" in out
  calls = [json.loads(l) for l in (state / "calls.jsonl").read_text().splitlines()]
  assert calls[0] == ["jobs", "queue", "--output", "json"]
  assert [c[c.index("--name") + 1] for c in calls[1:]] == [dwt1, dwt2]
  assert all(c[:5] == ["jobs", "launch", "--yes", "--detach-run", "--name"] for c in calls[1:])
  launched = yaml.safe_load((state / f"{dwt1}.yaml").read_text())
  sha = tpu.commit_of(repo)[0]
  assert launched["workdir"] == os.path.join(str(tmp_path), "runs", "tpu", sha[:12])
  assert open(os.path.join(launched["workdir"], "a.txt")).read() == "v1\n"   # shipped
  # job.json of each launched run (not the skipped one): tables.render finds their rows.
  found = {os.path.basename(d) for d in table_runs.run_dirs(gcs_bucket)}
  assert found == {j.name for j in _jobs()[1:]}
  assert storage.exists(rundir.job_path(storage.join(gcs_bucket, _jobs()[1].name)))


def test_a_launch_without_sky_names_how_to_install_it(tmp_path, monkeypatch):
  repo = _git_repo(tmp_path / "repo", {"a.txt": "v1\n"})
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match=r"found no 'no-such-sky': install SkyPilot in its own "
                                      r"environment .*skypilot\[gcp\]=="):
    tpu.launch(_jobs(), "paper", "gs://b/sd", _opts("sky=no-such-sky"), repo=repo)
