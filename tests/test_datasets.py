"""`palsctl data` and `palsctl.datasets`: downloads from a loopback HTTP server (resume,
checksums, progress), the data-folder lookup order, and the pinned manifest against the real
files when the data folder is present."""
from __future__ import annotations

import csv
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from palsctl import datasets, paths
from palsctl.cli import main
from palsctl.datasets import (
    DATASETS,
    DataError,
    Dataset,
    DerivedFile,
    UpstreamFile,
    fetch,
    flatten_mlenergy_tasks,
    get_datasets,
    sha256_file,
)
from palsctl.errors import ConfigError, UnknownNameError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` (URL path -> bytes) with HTTP range requests; ``server.cut``
    maps a path to a byte count after which the next response breaks off; ``server.ranges``
    False makes it ignore Range headers."""

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        cut = srv.cut.pop(self.path, None)
        self.wfile.write(body[start:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.cut, srv.ranges, srv.log = {}, {}, True, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _demo(server, name="demo", **contents: bytes) -> Dataset:
    """A data set of synthetic files served by ``server`` at raw.githubusercontent's layout."""
    files = []
    for dest, body in contents.items():
        files.append(UpstreamFile(dest=dest, path=f"data/{dest}", size_bytes=len(body),
                                  sha256=hashlib.sha256(body).hexdigest()))
        server.files[f"/owner/repo/{COMMIT}/data/{dest}"] = body
    return Dataset(name=name, title="demo", description="synthetic", license="MIT",
                   repo="owner/repo", commit=COMMIT, files=tuple(files),
                   data_files=tuple(contents))


BIG = bytes(range(256)) * 1024  # 256 KiB: several read blocks


def test_fetch_downloads_verifies_reports_progress_and_keeps_what_is_there(server, tmp_path):
    ds = _demo(server, **{"a.csv": BIG, "sub/b.txt": b"hello\n"})
    seen: dict[str, list[tuple[int, int]]] = {}
    res = fetch([ds], tmp_path, mirror=server.url,
                progress=lambda label, done, total: seen.setdefault(label, []).append(
                    (done, total)))
    assert [r.status for r in res] == ["downloaded", "downloaded"]
    assert (tmp_path / "demo" / "a.csv").read_bytes() == BIG
    assert (tmp_path / "demo" / "sub" / "b.txt").read_bytes() == b"hello\n"
    assert res[0].downloaded_bytes == len(BIG)
    done = [d for d, _ in seen["demo/a.csv"]]
    assert done == sorted(done) and done[-1] == len(BIG) and len(done) > 2
    assert {t for _, t in seen["demo/a.csv"]} == {len(BIG)}
    assert not list(tmp_path.rglob("*.part"))
    n = len(server.log)
    res = fetch([ds], tmp_path, mirror=server.url)
    assert [r.status for r in res] == ["present", "present"] and len(server.log) == n


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "server-ignores-range"])
def test_an_interrupted_download_resumes(server, tmp_path, ranges):
    ds = _demo(server, **{"a.csv": BIG})
    path = f"/owner/repo/{COMMIT}/data/a.csv"
    server.cut[path] = 100_000
    server.ranges = ranges
    with pytest.raises(DataError, match="interrupted at 100,000 of 262,144 bytes.*again to resume"):
        fetch([ds], tmp_path, mirror=server.url)
    part = tmp_path / "demo" / "a.csv.part"
    assert part.stat().st_size == 100_000 and not (tmp_path / "demo" / "a.csv").exists()
    (res,) = fetch([ds], tmp_path, mirror=server.url)
    assert server.log[-1] == (path, "bytes=100000-")
    assert (tmp_path / "demo" / "a.csv").read_bytes() == BIG and not part.exists()
    assert (res.status, res.downloaded_bytes) == (
        ("resumed", len(BIG) - 100_000) if ranges else ("downloaded", len(BIG)))


def test_a_complete_partial_file_is_verified_without_a_transfer(server, tmp_path):
    ds = _demo(server, **{"a.csv": b"12345"})
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "a.csv.part").write_bytes(b"12345")
    (res,) = fetch([ds], tmp_path, mirror=server.url)
    assert res.status == "resumed" and res.downloaded_bytes == 0 and server.log == []
    assert (tmp_path / "demo" / "a.csv").read_bytes() == b"12345"


def test_a_checksum_mismatch_installs_nothing(server, tmp_path):
    ds = _demo(server, **{"a.csv": b"the real bytes\n"})
    server.files[f"/owner/repo/{COMMIT}/data/a.csv"] = b"the wrong bytes"
    with pytest.raises(DataError, match=r"a\.csv: sha256 .* differs from the pinned"):
        fetch([ds], tmp_path, mirror=server.url)
    assert not list((tmp_path / "demo").iterdir())


def test_a_different_file_already_there_is_never_overwritten(server, tmp_path):
    ds = _demo(server, **{"a.csv": b"upstream\n"})
    mine = tmp_path / "demo" / "a.csv"
    mine.parent.mkdir()
    mine.write_bytes(b"my edited copy\n")
    with pytest.raises(DataError, match="exists but is not the upstream file.*move it away"):
        fetch([ds], tmp_path, mirror=server.url)
    assert mine.read_bytes() == b"my edited copy\n" and server.log == []


def test_network_errors_are_one_line_data_errors(server, tmp_path):
    ds = _demo(server, **{"a.csv": b"x"})
    server.files.clear()
    with pytest.raises(DataError, match="HTTP 404"):
        fetch([ds], tmp_path, mirror=server.url)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(DataError, match="run the same command again"):
        fetch([ds], tmp_path, mirror=f"http://127.0.0.1:{port}", timeout_s=5)
    with pytest.raises(DataError, match="mirror must be an http"):
        fetch([ds], tmp_path, mirror="ftp://example.org")


def test_derived_files_are_built_and_checked(server, tmp_path):
    base = _demo(server, **{"x.txt": b"abc"})
    good = hashlib.sha256(b"ABC").hexdigest()

    def upper(folder: Path) -> bytes:
        return (folder / "x.txt").read_bytes().upper()

    ds = Dataset(**{**base.__dict__, "derived": (DerivedFile(
        dest="X.txt", sha256=good, size_bytes=3, build=upper, how="upper-cased"),)})
    res = fetch([ds], tmp_path, mirror=server.url)
    assert [r.status for r in res] == ["downloaded", "built"]
    assert (tmp_path / "demo" / "X.txt").read_bytes() == b"ABC"
    assert fetch([ds], tmp_path, mirror=server.url)[1].status == "present"
    bad = Dataset(**{**ds.__dict__, "name": "bad", "derived": (DerivedFile(
        dest="X.txt", sha256="0" * 64, size_bytes=3, build=upper, how="upper-cased"),)})
    server.files[f"/owner/repo/{COMMIT}/data/x.txt"] = b"abc"
    with pytest.raises(DataError, match="upper-cased.*not installed"):
        fetch([bad], tmp_path, mirror=server.url)
    assert not (tmp_path / "bad" / "X.txt").exists()


def _task_json(task: str, rows: list[dict]) -> str:
    return json.dumps({"configurations": rows, "task": task, "task_display_name": task.upper()})


def test_flatten_mlenergy_tasks_rows_columns_and_exclusions(tmp_path):
    (tmp_path / "tasks").mkdir()
    row = {c: 1 for c in datasets.MLENERGY_COLUMNS if c != "task"}
    for task in datasets.MLENERGY_TASKS:
        rows = [dict(row, model_id=f"m/{task}", avg_power_watts=123.25, extra_field="x")]
        if task == "lm-arena-chat":
            rows.append(dict(row, model_id="meta-llama/Llama-3.1-70B-Instruct"))
        (tmp_path / "tasks" / f"{task}.json").write_text(_task_json(task, rows))
    data = flatten_mlenergy_tasks(tmp_path)
    assert data.count(b"\r\n") == 4
    got = list(csv.DictReader(data.decode().splitlines()))
    assert [r["task"] for r in got] == list(datasets.MLENERGY_TASKS)
    assert [r["model_id"] for r in got] == [f"m/{t}" for t in datasets.MLENERGY_TASKS]
    assert list(got[0]) == list(datasets.MLENERGY_COLUMNS) and got[0]["avg_power_watts"] == "123.25"
    (tmp_path / "tasks" / "gpqa.json").write_text("{}")
    with pytest.raises(DataError, match="gpqa.json: not an ML.ENERGY leaderboard task file"):
        flatten_mlenergy_tasks(tmp_path)


def test_get_datasets_and_names():
    assert [d.name for d in get_datasets(["vessim-grid", "all"])][0] == "vessim-grid"
    assert len(get_datasets(["all", "all"])) == len(DATASETS)
    with pytest.raises(UnknownNameError, match="known: all, azure-llm-2023"):
        get_datasets(["azure"])
    for ds in DATASETS.values():
        assert len(ds.commit) == 40 and all(len(f.sha256) == 64 for f in ds.files)
        assert set(ds.data_files) <= {f.dest for f in ds.files} | {d.dest for d in ds.derived}
        assert "LICENSE" in {f.dest for f in ds.files} and ds.license


def test_data_folder_lookup_order(tmp_path, monkeypatch):
    beside, cache, env, flag = (tmp_path / n for n in ("beside", "cache", "env", "flag"))
    monkeypatch.setattr(paths, "checkout_data_dir", lambda: beside)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("PALSCTL_DATA", raising=False)
    assert paths.cache_data_dir() == cache / "palsctl" / "data"
    assert paths.data_dir_origin() == (None, "none")
    (cache / "palsctl" / "data").mkdir(parents=True)
    assert paths.data_dir_origin() == (cache / "palsctl" / "data", "user cache")
    beside.mkdir()
    assert paths.data_dir_origin() == (beside, "beside the checkout")
    monkeypatch.setenv("PALSCTL_DATA", str(env))  # wins even before it exists
    assert paths.data_dir_origin() == (env, "PALSCTL_DATA")
    assert paths.data_dir_origin(flag) == (flag, "--data")
    with pytest.raises(ConfigError, match=r"data file not found: .*env/vessim-grid/x\.csv; get it "
                                          r"with `palsctl data fetch vessim-grid`"):
        paths.data_file("vessim-grid/x.csv")


def test_cli_fetch_stores_in_the_user_cache_unless_told_otherwise(server, tmp_path, monkeypatch,
                                                                   capsys):
    ds = _demo(server, **{"a.csv": BIG})
    monkeypatch.setattr(datasets, "DATASETS", {"demo": ds})
    monkeypatch.setattr(paths, "checkout_data_dir", lambda: tmp_path / "no-checkout-data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PALSCTL_DATA", raising=False)
    assert main(["data", "fetch", "--mirror", server.url]) == 0
    cached = tmp_path / "cache" / "palsctl" / "data" / "demo" / "a.csv"
    assert cached.read_bytes() == BIG
    out = capsys.readouterr().out
    assert "demo: 1 files verified (1 downloaded; 0.3 MB transferred)" in out
    assert "note:" not in out  # the cache is where palsctl reads now
    monkeypatch.setenv("PALSCTL_DATA", str(tmp_path / "env"))
    assert main(["data", "fetch", "demo", "--mirror", server.url, "-q"]) == 0
    assert sha256_file(tmp_path / "env" / "demo" / "a.csv") == ds.files[0].sha256
    assert main(["data", "fetch", "all", "--data", str(tmp_path / "flag"), "--mirror",
                 server.url, "-q"]) == 0
    assert (tmp_path / "flag" / "demo" / "a.csv").is_file()
    out = capsys.readouterr().out
    assert f"note: palsctl reads the data folder {tmp_path / 'env'} first" in out
    assert main(["data", "list", "--data", str(tmp_path / "flag")]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "yes" in out
    assert f"data folder: {tmp_path / 'flag'} (--data)\n" in out


def test_cli_errors_are_one_line_exit_2(server, tmp_path, capsys):
    assert main(["data", "fetch", "nope", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown data set 'nope'" in err
    assert main(["data", "fetch", "splitwise-perf", "--data", str(tmp_path), "-q",
                 "--mirror", server.url]) == 2  # the server has no such file
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HTTP 404" in err and "perf_model.csv" in err


# ---- the pinned manifest against the real files (when the data folder is present) -------------
def _serve_upstream_layout(server, folder: Path, names: list[str]) -> None:
    for name in names:
        ds = DATASETS[name]
        for f in ds.files:
            url = datasets.file_url(ds, f, mirror="")
            server.files[url] = (folder / name / f.dest).read_bytes()


def test_the_manifest_matches_the_real_files(server, tmp_path, shared_data, capsys):
    names = [n for n in DATASETS if n != "mlenergy-v3"]  # upstream JSON: not in the data folder
    _serve_upstream_layout(server, shared_data, names)
    assert main(["data", "fetch", *names, "--mirror", server.url, "--data", str(tmp_path),
                 "-q"]) == 0
    for name in names:
        for f in DATASETS[name].files:
            got = tmp_path / name / f.dest
            assert got.read_bytes() == (shared_data / name / f.dest).read_bytes()
            assert got.stat().st_size == f.size_bytes


def test_the_mlenergy_csv_is_rebuilt_byte_for_byte(tmp_path, shared_data):
    """Rebuild the upstream task JSON files from the curated CSV (values round-trip through
    their shortest repr), add a run of an excluded model, and flatten them again: the result's
    sha256 is the pinned one."""
    src = shared_data / "mlenergy-v3" / "llm_configs.csv"
    by_task: dict[str, list[dict]] = {}
    with src.open(newline="") as fh:
        for row in csv.DictReader(fh):
            task = row.pop("task")
            by_task.setdefault(task, []).append({k: _number(v) for k, v in row.items()})
    by_task["lm-arena-chat"].insert(3, dict(by_task["lm-arena-chat"][0],
                                            model_id="meta-llama/Llama-3.3-70B-Instruct"))
    (tmp_path / "tasks").mkdir()
    for task, rows in by_task.items():
        (tmp_path / "tasks" / f"{task}.json").write_text(_task_json(task, rows))
    built = flatten_mlenergy_tasks(tmp_path)
    (derived,) = DATASETS["mlenergy-v3"].derived
    assert hashlib.sha256(built).hexdigest() == derived.sha256 == sha256_file(src)
    assert len(built) == derived.size_bytes


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_a_config_naming_missing_data_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PALSCTL_DATA", str(tmp_path / "empty"))
    cfg = tmp_path / "x.toml"
    cfg.write_text('name = "x"\nduration_s = 10\n[plant]\nmodel = "llama-3.1-8b"\n'
                   'gpu = "h100-sxm"\n[workload]\nkind = "trace"\n'
                   'path = "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"\n'
                   '[controller]\nname = "static"\n')
    assert main(["run", str(cfg), "-q", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "workload.path" in err
    assert "get it with `palsctl data fetch azure-llm-2023`" in err
