"""download.sh against a fake bucket served on 127.0.0.1: a presigned URL with `*` and a query
string, Range requests for resuming, an expired-link mode; with wget and, with wget hidden, curl."""

import hashlib
import os
import random
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "download.sh"
QUERY = "Policy=eyJTdGF0ZW1lbnQiOiJ9&Signature=abc~def&Key-Pair-Id=K2X"
SHARDS = {"7b": 1, "13b": 2, "34b": 4, "70b": 8}
ALL_MODELS = [size + variant for variant in ("", "-Python", "-Instruct") for size in SHARDS]


def make_bucket():
    """{remote path: bytes} of a bucket laid out like Meta's, with tiny random files."""
    rng = random.Random(0)
    bucket = {"LICENSE": b"license text\n", "USE_POLICY.md": b"# Use policy\n"}
    for model in ALL_MODELS:
        folder = f"CodeLlama-{model}"
        files = {f"consolidated.{i:02d}.pth": rng.randbytes(200) for i in range(SHARDS[model.split("-")[0]])}
        files["params.json"] = b'{"dim": 4096}'
        files["tokenizer.model"] = rng.randbytes(100)
        if model == "7b":  # big enough for a resume to matter
            files["consolidated.00.pth"] = rng.randbytes(300_000)
        checklist = "".join(f"{hashlib.md5(data).hexdigest()}  {name}\n" for name, data in files.items())
        files["checklist.chk"] = checklist.encode()
        bucket.update({f"{folder}/{name}": data for name, data in files.items()})
    return bucket


class Bucket(ThreadingHTTPServer):
    """Serves `files` at /bucket/<path>?QUERY, honouring Range; records every request."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), BucketHandler)
        self.files = make_bucket()
        self.requests = []  # (path, Range header or None)
        self.status = None  # answer every request with this status when set (e.g. 403)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/bucket/*?{QUERY}"


class BucketHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        bucket: Bucket = self.server
        url = urlsplit(self.path)
        path = url.path.removeprefix("/bucket/")
        bucket.requests.append((path, self.headers.get("Range")))
        if bucket.status is not None or url.query != QUERY:
            return self.reply(bucket.status or 403, b"AccessDenied")
        if path not in bucket.files:
            return self.reply(404, b"NoSuchKey")
        data = bucket.files[path]
        ranged = self.headers.get("Range")
        if ranged is None:
            return self.reply(200, data)
        start = int(ranged.removeprefix("bytes=").split("-")[0])
        if start >= len(data):
            return self.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        return self.reply(206, data[start:], headers)

    def reply(self, status, body, headers=None):
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def bucket():
    server = Bucket()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def path_without(tmp_path_factory, *hidden):
    """A PATH with every program of the current PATH except `hidden` (e.g. to force curl)."""
    bin_dir = tmp_path_factory.mktemp("bin-without-" + "-".join(hidden))
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = bin_dir / entry.name
            if entry.name not in hidden and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(bin_dir)


DOWNLOADERS = [d for d in ("wget", "curl") if shutil.which(d)]


@pytest.fixture(scope="module")
def curl_only_path(tmp_path_factory):
    return path_without(tmp_path_factory, "wget")


@pytest.fixture(params=DOWNLOADERS)
def downloader_path(request):
    """A PATH on which download.sh finds `wget` (the default), or only `curl`."""
    if request.param == "wget":
        return os.environ["PATH"]
    return request.getfixturevalue("curl_only_path")


def run_download(cwd, path=None, stdin=None, **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("PRESIGNED_URL", "MODEL_SIZE", "TARGET_FOLDER")}
    env.update(env_vars, PATH=path or os.environ["PATH"])
    bash = shutil.which("bash")
    done = subprocess.run(
        [bash, str(SCRIPT)],
        cwd=cwd,
        env=env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout, done.stderr


def expected_files(bucket, models):
    names = ["LICENSE", "USE_POLICY.md"]
    for model in models:
        names += [name for name in bucket.files if name.startswith(f"CodeLlama-{model}/")]
    return sorted(names)


def downloaded(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def assert_verified(bucket, folder, models):
    assert downloaded(folder) == expected_files(bucket, models)
    for name in expected_files(bucket, models):
        assert (Path(folder) / name).read_bytes() == bucket.files[name], name


def last_line(text):
    return text.strip().splitlines()[-1]


def test_clean_download_verifies(bucket, downloader_path, tmp_path):
    target = tmp_path / "weights"
    status, out, err = run_download(
        tmp_path,
        downloader_path,
        PRESIGNED_URL=bucket.url,
        MODEL_SIZE="7b,13b-Python",
        TARGET_FOLDER=str(target),
    )
    assert status == 0, err
    assert_verified(bucket, target, ["7b", "13b-Python"])
    requested = sorted(path for path, _ in bucket.requests)
    assert requested == expected_files(bucket, ["7b", "13b-Python"])  # each once, with the query string
    assert "CodeLlama-13b-Python/consolidated.01.pth" in requested
    assert out.count(": OK") == 3 + 4  # md5sum -c: 7b (1 shard + 2 files), 13b (2 shards + 2 files)


def test_interrupted_file_resumes(bucket, downloader_path, tmp_path):
    full = bucket.files["CodeLlama-7b/consolidated.00.pth"]
    partial = tmp_path / "CodeLlama-7b" / "consolidated.00.pth"
    partial.parent.mkdir()
    partial.write_bytes(full[:123_456])
    status, out, err = run_download(tmp_path, downloader_path, PRESIGNED_URL=bucket.url, MODEL_SIZE="7b")
    assert status == 0, err
    assert ("CodeLlama-7b/consolidated.00.pth", "bytes=123456-") in bucket.requests
    assert_verified(bucket, tmp_path, ["7b"])


def test_rerun_after_a_complete_download_keeps_the_files(bucket, downloader_path, tmp_path):
    for _ in range(2):
        status, out, err = run_download(tmp_path, downloader_path, PRESIGNED_URL=bucket.url, MODEL_SIZE="7b")
        assert status == 0, err
    assert_verified(bucket, tmp_path, ["7b"])


def test_corrupted_file_fails_naming_it(bucket, downloader_path, tmp_path):
    bucket.files["CodeLlama-7b/tokenizer.model"] = b"not the file the checklist describes"
    status, out, err = run_download(tmp_path, downloader_path, PRESIGNED_URL=bucket.url, MODEL_SIZE="7b")
    assert status != 0
    line = last_line(err)
    assert line.startswith("error: checksum mismatch: CodeLlama-7b/tokenizer.model ")
    assert "consolidated" not in line


def test_unknown_model_fails_before_downloading(bucket, tmp_path):
    status, out, err = run_download(tmp_path, PRESIGNED_URL=bucket.url, MODEL_SIZE="7b,8b-Python")
    assert status != 0
    assert err.strip().splitlines() == [
        "error: unknown model '8b-Python': choose from " + ",".join(ALL_MODELS)
    ]
    assert bucket.requests == [] and downloaded(tmp_path) == []


def test_expired_link_fails_with_the_expiry_hint(bucket, downloader_path, tmp_path):
    bucket.status = 403
    status, out, err = run_download(tmp_path, downloader_path, PRESIGNED_URL=bucket.url, MODEL_SIZE="7b")
    assert status != 0
    line = last_line(err)
    assert line.startswith("error: HTTP 403 for LICENSE: ")
    assert "may have expired" in line and "24 hours" in line
    assert downloaded(tmp_path) == []  # no empty file left behind


def test_missing_file_is_a_404_with_the_expiry_hint(bucket, downloader_path, tmp_path):
    del bucket.files["CodeLlama-34b/params.json"]
    status, out, err = run_download(tmp_path, downloader_path, PRESIGNED_URL=bucket.url, MODEL_SIZE="34b")
    assert status != 0
    line = last_line(err)
    assert line.startswith("error: HTTP 404 for CodeLlama-34b/params.json: ") and "expired" in line


def test_answers_piped_on_stdin(bucket, tmp_path):
    status, out, err = run_download(tmp_path, stdin=f"{bucket.url}\n7b-instruct,70b\n")
    assert status == 0, err
    assert_verified(bucket, tmp_path, ["7b-Instruct", "70b"])  # names are matched case-insensitively


def test_enter_downloads_every_model(bucket, tmp_path):
    status, out, err = run_download(tmp_path, stdin=f"{bucket.url}\n\n", TARGET_FOLDER="all")
    assert status == 0, err
    assert_verified(bucket, tmp_path / "all", ALL_MODELS)
    assert len([p for p in downloaded(tmp_path / "all") if p.endswith(".pth")]) == 3 * (1 + 2 + 4 + 8)


def test_no_url_fails(tmp_path):
    status, out, err = run_download(tmp_path, stdin="")
    assert status != 0 and last_line(err).startswith("error: no download URL given")


def test_url_without_star_fails(bucket, tmp_path):
    url = bucket.url.replace("*", "CodeLlama-7b")
    status, out, err = run_download(tmp_path, PRESIGNED_URL=url, MODEL_SIZE="7b")
    assert status != 0 and "has no '*'" in last_line(err)
    assert bucket.requests == []


def test_missing_tools_fail(bucket, tmp_path, tmp_path_factory):
    no_downloader = path_without(tmp_path_factory, "wget", "curl")
    status, out, err = run_download(tmp_path, no_downloader, PRESIGNED_URL=bucket.url, MODEL_SIZE="7b")
    assert status != 0 and last_line(err).startswith("error: download.sh needs wget or curl")
    no_md5sum = path_without(tmp_path_factory, "md5sum")
    status, out, err = run_download(tmp_path, no_md5sum, PRESIGNED_URL=bucket.url, MODEL_SIZE="7b")
    assert status != 0 and last_line(err).startswith("error: download.sh needs md5sum")
    assert bucket.requests == []
