"""Fixtures: tiny random BERTs saved with save_pretrained (so the real loading path runs), tiny task data, a temp
working folder and a throwaway PostgreSQL server. The functions that make the models and data are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import save_tiny_bert, save_tiny_mpnet, write_tsv

# Never let a test reach for the hub: transformers would retry for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's spinning OpenMP threads made
# a tiny distill 4x slower (45 s against 11 s). Set before torch is imported; subprocesses (DDP, kill -9) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_teacher(tiny_root) -> Path:
    """A 4-layer, 32-wide BERT with a 2-label head (random weights)."""
    return save_tiny_bert(tiny_root / "teacher")


@pytest.fixture(scope="session")
def tiny_encoder(tiny_root) -> Path:
    """The same shape without a classifier head, like a pretrained encoder."""
    return save_tiny_bert(tiny_root / "encoder", head=False)


@pytest.fixture(scope="session")
def tiny_mpnet(tiny_root) -> Path:
    """A 2-layer, 48-wide MPNet encoder with no classifier and its own WordPiece vocabulary (other ids than the tiny
    BERT's): a teacher of another family, which distill fine-tunes first."""
    return save_tiny_mpnet(tiny_root / "mpnet")


@pytest.fixture(scope="module")
def bert(tiny_teacher):
    """The tiny teacher loaded as transformers' own BertForSequenceClassification, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny_teacher).eval()


@pytest.fixture(scope="session")
def tiny_data(tiny_root) -> Path:
    return write_tsv(tiny_root / "data")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in a temp dir so mlruns/ and outputs/ land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Postgres:
    """A throwaway PostgreSQL cluster on a free localhost port, run as the `postgres` user when tests run as root
    (the server refuses root). Databases are made with createdb and inspected with psql, not with compress's code."""

    def __init__(self, bin_dir: Path, root: Path) -> None:
        import socket

        self.bin, self.root = bin_dir, root
        with socket.socket() as s:
            s.bind(("localhost", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres")
        self._run("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start", "-o",
                  f"-k {root} -p {self.port} -c listen_addresses=localhost")

    def _run(self, tool: str, *args: str) -> str:
        import subprocess

        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{tool}: {done.stderr[-2000:]}"
        return done.stdout

    def url(self, db: str, password: str = "") -> str:
        return f"postgresql://postgres{':' + password if password else ''}@localhost:{self.port}/{db}"

    def create(self, db: str) -> str:
        self._run("createdb", "-h", "localhost", "-p", str(self.port), "-U", "postgres", db)
        return self.url(db)

    def sql(self, db: str, statement: str) -> str:
        return self._run("psql", "-h", "localhost", "-p", str(self.port), "-U", "postgres", "-d", db, "-Atc",
                         statement)

    def tables(self, db: str) -> list[str]:
        return self.sql(db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").split()

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")


def _postgres_bin() -> Path | None:
    import glob
    import shutil

    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").is_file():
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="session")
def postgres():
    """A live PostgreSQL server, for compress search --storage and --tracking on a shared database. Skipped where
    the server is not installed, except under CI (.ci/run sets COMPRESS_TEST_POSTGRES=required and installs it)."""
    import shutil
    import tempfile

    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("COMPRESS_TEST_POSTGRES") == "required":
            pytest.fail("COMPRESS_TEST_POSTGRES=required, but no PostgreSQL server is installed (apt install "
                        "postgresql)")
        pytest.skip("no PostgreSQL server installed (apt install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="compress-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    server = Postgres(bin_dir, root)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

