"""The public data sets palsctl reads, where they come from, and how to download them.

Each data set is published by others in a public git repository; palsctl pins the upstream
commit and the sha256 of every file, downloads the raw files over HTTPS
(``https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>``, or a mirror with the same
layout), verifies them, and stores them in the data folder (`palsctl.paths`) under the data
set's name. Interrupted downloads resume (HTTP range requests on ``<file>.part``); a file whose
checksum differs is never installed.

One file is not published as-is: ``mlenergy-v3/llm_configs.csv`` is a flattening of the ML.ENERGY
leaderboard's per-task JSON files into one CSV row per vLLM run. `fetch` downloads the upstream
JSON files (``mlenergy-v3/tasks/*.json``) and builds the CSV with `flatten_mlenergy_tasks`, which
reproduces the curated file byte for byte (its sha256 is checked like a download's).

>>> sorted(DATASETS)[:2]
['azure-llm-2023', 'mlenergy-v3']
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from palsctl.errors import PalsctlError, UnknownNameError

__all__ = ["DATASETS", "DEFAULT_MIRROR", "DataError", "Dataset", "DerivedFile", "FetchResult",
           "UpstreamFile", "fetch", "file_url", "flatten_mlenergy_tasks", "get_datasets",
           "missing_files", "sha256_file"]

DEFAULT_MIRROR = "https://raw.githubusercontent.com"
_CHUNK = 1 << 16

# (label, bytes done, bytes expected) while a file downloads or is checked
ProgressFn = Callable[[str, int, int], None]


class DataError(PalsctlError):
    """A data set could not be downloaded or verified (the message says which file and why)."""


@dataclass(frozen=True, kw_only=True)
class UpstreamFile:
    """One file of a data set as published upstream.

    ``dest`` is its path inside the data set's folder, ``path`` its path in the upstream
    repository; ``repo``/``commit`` default to the data set's."""

    dest: str
    path: str
    sha256: str
    size_bytes: int
    repo: str = ""
    commit: str = ""


@dataclass(frozen=True, kw_only=True)
class DerivedFile:
    """A file palsctl builds from a data set's downloaded files (``build(folder) -> bytes``)."""

    dest: str
    sha256: str
    size_bytes: int
    build: Callable[[Path], bytes]
    how: str


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A public data set: ``name`` is its folder in the data folder; ``data_files`` the files
    palsctl reads (relative to that folder); ``files`` everything downloaded (data, LICENSE,
    upstream READMEs); ``derived`` files built from them."""

    name: str
    title: str
    description: str
    license: str
    repo: str
    commit: str
    files: tuple[UpstreamFile, ...]
    data_files: tuple[str, ...]
    derived: tuple[DerivedFile, ...] = ()
    cite: str = ""

    @property
    def size_bytes(self) -> int:
        """Bytes downloaded by `fetch`."""
        return sum(f.size_bytes for f in self.files)

    @property
    def data_paths(self) -> tuple[str, ...]:
        """The files palsctl reads, relative to the data folder (``<name>/<file>``)."""
        return tuple(f"{self.name}/{f}" for f in self.data_files)

    @property
    def url(self) -> str:
        """The upstream repository at the pinned commit."""
        return f"https://github.com/{self.repo}/tree/{self.commit}"


# ---- ML.ENERGY: the curated CSV is built from the upstream per-task JSON files ----------------
MLENERGY_TASKS = ("lm-arena-chat", "gpqa", "sourcegraph-fim")
# runs the curated llm_configs.csv leaves out (all on lm-arena-chat)
MLENERGY_EXCLUDED_MODELS = frozenset({
    "Qwen/Qwen3-235B-A22B-Instruct-2507", "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/Llama-3.3-70B-Instruct", "meta-llama/Llama-4-Scout-17B-16E-Instruct"})
MLENERGY_COLUMNS = (
    "task", "model_id", "nickname", "architecture", "total_params_billions",
    "activated_params_billions", "weight_precision", "gpu_model", "num_gpus", "tensor_parallel",
    "expert_parallel", "data_parallel", "max_num_seqs", "avg_batch_size", "avg_output_len",
    "avg_power_watts", "energy_per_token_joules", "energy_per_request_joules",
    "output_throughput_tokens_per_sec", "median_itl_ms", "p90_itl_ms", "p95_itl_ms",
    "p99_itl_ms")


def flatten_mlenergy_tasks(folder: Path) -> bytes:
    """``llm_configs.csv`` from the leaderboard's ``tasks/<task>.json`` files in ``folder``:
    one row per run (``configurations`` entry) of the tasks lm-arena-chat, gpqa and
    sourcegraph-fim in that order, the columns of `MLENERGY_COLUMNS`, the runs of
    `MLENERGY_EXCLUDED_MODELS` left out, CSV with CRLF line ends (Python's csv module)."""
    rows = []
    for task in MLENERGY_TASKS:
        path = Path(folder) / "tasks" / f"{task}.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            configs = doc["configurations"]
            name = doc["task"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: not an ML.ENERGY leaderboard task file ({exc})") from None
        rows += [{"task": name, **c} for c in configs
                 if c.get("model_id") not in MLENERGY_EXCLUDED_MODELS]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=MLENERGY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _f(dest: str, path: str, sha256: str, size_bytes: int, **kw: str) -> UpstreamFile:
    return UpstreamFile(dest=dest, path=path, sha256=sha256, size_bytes=size_bytes, **kw)


_ZEUS_TRACE = "examples/research_reproducibility/zeus_nsdi23/trace"
_ZEUS_COMMIT = "75a8b9398034eb9baf74ca0a830c2c31bcce52cd"

DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset(
        name="azure-llm-2023",
        title="Azure LLM inference trace 2023",
        description="arrival times with prompt and output token counts of two Azure LLM "
                    "services over one hour (code: 8,819 requests; conversation: 19,366): the "
                    "workload that trace experiments replay",
        license="CC-BY-4.0", repo="Azure/AzurePublicDataset",
        commit="b469a113cedca53ddc3bdea71a143dc4b7d8700c",
        cite="Patel et al., Splitwise, ISCA 2024",
        files=(
            _f("AzureLLMInferenceTrace_code.csv", "data/AzureLLMInferenceTrace_code.csv",
               "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6", 320117),
            _f("AzureLLMInferenceTrace_conv.csv", "data/AzureLLMInferenceTrace_conv.csv",
               "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8", 719188),
            _f("AzureLLMInferenceDataset2023.md", "AzureLLMInferenceDataset2023.md",
               "9996a0d9e4d94ee52bc3564a33f51e172a34f4a58960a05f066a2b8061f9a1e0", 2636),
            _f("AzureLLMInferenceDataset2024.md", "AzureLLMInferenceDataset2024.md",
               "e63b1037da03bccd73cdcab0c4cad4dda3caf5bc06545e5d9bfb3dc4bdd51d09", 2501),
            _f("LICENSE", "LICENSE",
               "9bbc1ea9fe5c96df01b311a2ac864d5b18fc87b9948bfd14770e4b44db755ee9", 18653),
        ),
        data_files=("AzureLLMInferenceTrace_code.csv", "AzureLLMInferenceTrace_conv.csv")),
    Dataset(
        name="mooncake-fast25",
        title="Mooncake traces (FAST'25)",
        description="long-context request traces of Kimi's serving system (timestamp, input "
                    "and output lengths, prefix-cache block ids): conversation, 12,031 requests "
                    "in one hour; synthetic, 3,993",
        license="Apache-2.0", repo="kvcache-ai/Mooncake",
        commit="3b5a594133958449a1feaf1c9e0fc1b553e34a28",
        cite="Qin et al., Mooncake, FAST 2025",
        files=(
            _f("conversation_trace.jsonl", "FAST25-release/traces/conversation_trace.jsonl",
               "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df", 3029533),
            _f("synthetic_trace.jsonl", "FAST25-release/traces/synthetic_trace.jsonl",
               "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131", 1136313),
            _f("README.md", "FAST25-release/README.md",
               "720b7571cfdfbc12555fd2bee9e9ba5479dffc7e355a1c5b049035388e3761d7", 3107),
            _f("LICENSE", "LICENSE-APACHE",
               "58d1e17ffe5109a7ae296caafcadfdbe6a7d176f0bc4ab01e12a689b0499d8bd", 11357),
        ),
        data_files=("conversation_trace.jsonl", "synthetic_trace.jsonl")),
    Dataset(
        name="mlenergy-v3",
        title="ML.ENERGY Benchmark v3 (LLM runs)",
        description="measured vLLM runs on H100 and B200 at the default power limit: average "
                    "power, throughput, energy per token and inter-token latency against "
                    "max_num_seqs, dense and MoE models; calibrates the simulated plant",
        license="Apache-2.0 (per the ML.ENERGY dataset card)", repo="ml-energy/leaderboard",
        commit="0cd52dab897c5d91a45f4d413038f3b8b4251b0f",
        cite="Chung et al., The ML.ENERGY Benchmark, NeurIPS Datasets & Benchmarks 2025",
        files=(
            _f("tasks/lm-arena-chat.json", "public/data/tasks/lm-arena-chat.json",
               "24e25d46cdd6a9d9d58f8de63928d6f42601f9966d22e4d7a478e5f11f89a7ec", 286127),
            _f("tasks/gpqa.json", "public/data/tasks/gpqa.json",
               "792582efd1473e9cbc41200deac4d420a106c9207c68928cc7e712e3b55132dc", 161530),
            _f("tasks/sourcegraph-fim.json", "public/data/tasks/sourcegraph-fim.json",
               "e74db077b9cdff916d9a60f482dc5cc1d0be220fc701c7ce0d6408c6c6cf7034", 43583),
            _f("leaderboard-README.md", "README.md",
               "b48eb72d269e7107019669ba873e7bf6796c1c192b7267872245f2888282505c", 1468),
            # the leaderboard repository has no LICENSE file; its dataset card names
            # Apache-2.0, whose text ML.ENERGY's zeus repository carries
            _f("LICENSE", "LICENSE",
               "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4", 11357,
               repo="ml-energy/zeus", commit=_ZEUS_COMMIT),
        ),
        derived=(DerivedFile(
            dest="llm_configs.csv",
            sha256="474cadc97854ec899207c1be9ad4fe175259fcd9df5ad9923935627340251383",
            size_bytes=135870, build=flatten_mlenergy_tasks,
            how="flattened from tasks/*.json by palsctl.datasets.flatten_mlenergy_tasks"),),
        data_files=("llm_configs.csv",)),
    Dataset(
        name="zeus-power",
        title="Zeus power-limit traces (NSDI'23)",
        description="time per epoch and average power for every GPU power limit x batch size "
                    "(DNN training on A40, V100, RTX 6000, P100: the shape of the response to "
                    "a power cap), and a 30-minute carbon-intensity trace",
        license="Apache-2.0", repo="ml-energy/zeus", commit=_ZEUS_COMMIT,
        cite="You et al., Zeus, NSDI 2023",
        files=tuple(
            _f(f"{n}.csv", f"{_ZEUS_TRACE}/{n}.csv", h, s) for n, h, s in (
                ("summary_power_a40",
                 "f4ec111fc9b06b353182faab9160ecb1236a486b2741ed93383b80497332031e", 29641),
                ("summary_power_p100",
                 "158e9a6784b6e2d26710529b132cf173b227dc8688f4931c19a637bce2b7503b", 18163),
                ("summary_power_rtx6000",
                 "edccecc7f8b7a6102962b03f0f37767dd9cd2f03469ebccadc9805e82901bdc4", 27704),
                ("summary_power_v100",
                 "f0b066dd1a451bd78f730e001ac3a7c411979bc7f0846f12c1a9fb604aa90628", 32534),
                ("summary_train",
                 "076b35615349ee624403006e5ad67fd9ebda92af690c7750f8bb0c2ab92c0cf4", 186977),
            )) + (
            # the carbon trace is on the repository's `chase` branch, not on the pinned commit
            _f("carbon_hist.csv", "trace/carbon_hist.csv",
               "bf8da65ddfcd30a2b7380adaa92be2ad63abc82e6a2dbc50cea2fcd0a6c7a794", 13297,
               commit="a17ec338090467ac326092eef592635acab12e9d"),
            _f("trace-README.md", f"{_ZEUS_TRACE}/README.md",
               "6187c70a351133f8c03c7dff7a65c5500bd859b3f48355b7997a60c81ad39ea7", 5168),
            _f("LICENSE", "LICENSE",
               "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4", 11357),
        ),
        data_files=("summary_power_a40.csv", "summary_power_p100.csv",
                    "summary_power_rtx6000.csv", "summary_power_v100.csv", "carbon_hist.csv")),
    Dataset(
        name="splitwise-perf",
        title="SplitwiseSim performance model",
        description="prefill and decode time against batch, prompt size and tensor parallelism "
                    "for Llama2-70B and BLOOM-176B on A100/H100 (the power-capped H100 rows are "
                    "modelled upstream, not measured)",
        license="MIT", repo="Mutinifni/splitwise-sim",
        commit="8f99e7dc9b407f4ce2488d03dd44c0b8b946dab0",
        cite="Patel et al., Splitwise, ISCA 2024",
        files=(
            _f("perf_model.csv", "data/perf_model.csv",
               "dbbe505d1d64fc4bd1ec03c50edf944643586de4f68a81e94cbd55dd5bdfbf41", 127281),
            _f("LICENSE", "LICENSE",
               "f2b1ec08b69b4582ed0480150ac6fc3ee7cd247c240a853dd3729bd2b661f52d", 1071),
        ),
        data_files=("perf_model.csv",)),
    Dataset(
        name="vessim-grid",
        title="vessim grid signals",
        description="WattTime CAISO-North marginal emissions every 5 min for 31 days, solar "
                    "output for 10 cities and hourly load traces: dynamic power budgets",
        license="MIT (WattTime and Solcast data terms apply)", repo="dos-group/vessim",
        commit="408ed48db0cb21221970627dd1244e6b5edd86d4",
        cite="Wiesner et al., Vessim, ACM SIGENERGY Energy Informatics Review 2024",
        files=(
            _f("load_example.csv", "datasets/load_example.csv",
               "a531d06181fe149f66129c15ac4ecf07a7d34afd8a4477696d76b832113474d7", 58624),
            _f("solar_example.csv", "datasets/solar_example.csv",
               "572ed0ace354451af42fce83e0e4c4ce7368a564fefc4ac81ceb311f96eefa4a", 616528),
            _f("watttime_example.csv", "datasets/watttime_example.csv",
               "5685f559e0e34d3ef1bcb84d531cdbf1c19edd4440ef3feef4e9f61e37c713dc", 298410),
            _f("LICENSE", "LICENSE",
               "a7dcf4001fa70e02947150bdd8cc9038c8fbeb8c95aad28ba929668ac5bbe7e6", 1085),
        ),
        data_files=("load_example.csv", "solar_example.csv", "watttime_example.csv")),
)}


def get_datasets(names: Iterable[str]) -> list[Dataset]:
    """The data sets named (``"all"``: every one), in the order given, each once."""
    out: list[Dataset] = []
    for name in names:
        if name == "all":
            chosen = list(DATASETS.values())
        elif name in DATASETS:
            chosen = [DATASETS[name]]
        else:
            raise UnknownNameError("data set", name, [*DATASETS, "all"])
        out += [d for d in chosen if d not in out]
    return out


def missing_files(dataset: Dataset, folder: Path | None) -> list[str]:
    """The files of ``dataset`` that palsctl reads and ``folder`` (the data folder) lacks,
    relative to the data folder."""
    if folder is None:
        return list(dataset.data_paths)
    return [r for r in dataset.data_paths if not (Path(folder) / r).is_file()]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_url(dataset: Dataset, f: UpstreamFile, mirror: str = DEFAULT_MIRROR) -> str:
    """``<mirror>/<owner>/<repo>/<commit>/<path>`` (raw.githubusercontent.com's layout)."""
    return (f"{mirror.rstrip('/')}/{f.repo or dataset.repo}/{f.commit or dataset.commit}/"
            f"{f.path}")


@dataclass(frozen=True, kw_only=True)
class FetchResult:
    """What `fetch` did with one file: ``status`` is ``"present"`` (already there, checksum
    verified), ``"downloaded"``, ``"resumed"`` (a partial download completed) or ``"built"``
    (a derived file); ``downloaded_bytes`` counts this call's transfer only."""

    dataset: str
    path: Path
    status: str
    downloaded_bytes: int = 0


def fetch(datasets: Iterable[Dataset], folder: Path, *, mirror: str = DEFAULT_MIRROR,
          progress: ProgressFn | None = None, timeout_s: float = 60.0) -> list[FetchResult]:
    """Download ``datasets`` into ``folder/<name>/``, verify each file's sha256, and build the
    derived files. Files already there with the right checksum are kept; a partial download
    (``<file>.part``) resumes; a file that is there with another checksum is left alone and
    reported (`DataError`), never overwritten. Raises `DataError` naming the file and the URL on
    a network error (what arrived is kept, so running again resumes) or a checksum mismatch
    (the bad download is deleted)."""
    if not mirror.startswith(("http://", "https://")):
        raise DataError(f"mirror must be an http:// or https:// URL (got {mirror!r})")
    results: list[FetchResult] = []
    for ds in datasets:
        base = Path(folder) / ds.name
        for f in ds.files:
            results.append(_fetch_file(ds, f, base / f.dest, file_url(ds, f, mirror), progress,
                                       timeout_s))
        for d in ds.derived:
            results.append(_build_derived(ds, d, base))
    return results


def _check_existing(path: Path, sha256: str, what: str) -> bool:
    """True when ``path`` holds the expected bytes; False when absent; `DataError` otherwise."""
    if not path.exists():
        return False
    got = sha256_file(path)
    if got != sha256:
        raise DataError(f"{path} exists but is not {what} (sha256 {got[:12]}..., expected "
                        f"{sha256[:12]}...); move it away and fetch again")
    return True


def _fetch_file(ds: Dataset, f: UpstreamFile, dest: Path, url: str,
                progress: ProgressFn | None, timeout_s: float) -> FetchResult:
    label = f"{ds.name}/{f.dest}"
    if _check_existing(dest, f.sha256, f"the upstream file {url}"):
        if progress:
            progress(label, f.size_bytes, f.size_bytes)
        return FetchResult(dataset=ds.name, path=dest, status="present")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data folder {dest.parent}: {exc}") from None
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > f.size_bytes:  # not a prefix of this file
        part.unlink()
        have = 0
    sent, resumed = 0, have > 0
    if have < f.size_bytes:
        sent, resumed = _download(url, part, have, f.size_bytes, label, progress, timeout_s)
    digest = sha256_file(part)
    if digest != f.sha256:
        part.unlink()
        raise DataError(f"{url}: sha256 {digest[:12]}... differs from the pinned "
                        f"{f.sha256[:12]}...; the download was deleted (run again, or report "
                        "it if it persists)")
    os.replace(part, dest)
    return FetchResult(dataset=ds.name, path=dest, status="resumed" if resumed else "downloaded",
                       downloaded_bytes=sent)


def _download(url: str, part: Path, have: int, size: int, label: str,
              progress: ProgressFn | None, timeout_s: float) -> tuple[int, bool]:
    """Append the bytes of ``url`` from offset ``have`` to ``part`` (or rewrite it when the
    server ignores the range); returns the bytes transferred and whether it resumed."""
    from palsctl import __version__

    headers = {"User-Agent": f"palsctl/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 - fetch() lets only http(s) mirrors in
    done = start = have
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - fetch() lets only http(s) mirrors in
            if have and resp.status != 206:  # the server sent the whole file: start over
                done = 0
            start = done
            with open(part, "ab" if done else "wb") as out:
                if progress:
                    progress(label, done, size)
                while True:
                    block = resp.read(_CHUNK)
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(label, done, size)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the partial file is complete
            return 0, True
        raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        raise DataError(f"download of {url} interrupted at {done:,} of {size:,} bytes "
                        f"({reason}); run the same command again to resume") from None
    if done < size:
        raise DataError(f"download of {url} interrupted at {done:,} of {size:,} bytes "
                        "(the connection closed); run the same command again to resume")
    return done - start, start > 0


def _build_derived(ds: Dataset, d: DerivedFile, base: Path) -> FetchResult:
    dest = base / d.dest
    if _check_existing(dest, d.sha256, f"the file palsctl builds ({d.how})"):
        return FetchResult(dataset=ds.name, path=dest, status="present")
    data = d.build(base)
    digest = hashlib.sha256(data).hexdigest()
    if digest != d.sha256:
        raise DataError(f"{dest}: the file built ({d.how}) has sha256 {digest[:12]}..., "
                        f"expected {d.sha256[:12]}...; not installed")
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return FetchResult(dataset=ds.name, path=dest, status="built")
