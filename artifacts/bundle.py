"""The bundle on disk: written atomically, loaded only after every checksum verifies.

    <bundle>/manifest.json        what is inside (schema below), every file's sha256 and size
    <bundle>/manifest.sha256      sha256 of manifest.json's exact bytes
    <bundle>/engines/<target>/    engine files per target
    <bundle>/tokenizer/           tokenizer.json, tokenizer_config.json, chat template...
    <bundle>/report.json          build report (stage timings, notes)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmc import __version__
from llmc.artifacts.geometry import ModelGeometry
from llmc.artifacts.manifest import MIN_SCHEMA_VERSION, SCHEMA_VERSION, FileEntry, Manifest, manifest_from_dict
from llmc.errors import BundleError

MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest.sha256"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    manifest: Manifest

    @property
    def geometry(self) -> ModelGeometry:
        """The model's geometry."""
        return self.manifest.model

    @property
    def block_size(self) -> int:
        """Tokens per KV block the engines were built for."""
        return self.manifest.kv_cache.block_size

    @property
    def kv_dtype(self) -> str:
        """The KV pools' dtype the engines were built for (float32, float16 or int8)."""
        return self.manifest.kv_cache.dtype

    def engine_dir(self, target: str) -> Path:
        """Directory of one target's engine files."""
        engines = self.manifest.engines
        if target not in engines:
            raise BundleError(f"{self.path}: no {target!r} engine in this bundle (it has: {', '.join(engines)}); "
                              f"rebuild with `targets: [{target}]`")
        return self.path / engines[target].dir

    @property
    def tokenizer_dir(self) -> Path:
        """Directory of the tokenizer files."""
        return self.path / self.manifest.tokenizer.dir


def write_bundle(staging: Path, final: Path, manifest: Manifest) -> Path:
    """Checksum every file under `staging`, write the manifest last, then move it into place atomically.

    A crash before the final rename leaves only the hidden staging directory: never a bundle
    that looks complete.
    """
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        files[path.relative_to(staging).as_posix()] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    manifest = manifest.model_copy(update={"files": files})
    body = json.dumps(manifest.to_dict(), indent=2).encode()
    (staging / MANIFEST).write_bytes(body)
    (staging / MANIFEST_CHECKSUM).write_text(hashlib.sha256(body).hexdigest() + "\n")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def staging_dir(final: Path) -> Path:
    """A fresh hidden directory beside `final` to build into."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def read_manifest(path: Path) -> Manifest:
    """Parse manifest.json; check its schema version, its own checksum and every section's fields."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST}); an interrupted build leaves none — rebuild it")
    body = manifest_path.read_bytes()
    try:
        manifest = json.loads(body)
        version = int(manifest["schema_version"])
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{manifest_path}: corrupt manifest ({err}); rebuild the bundle") from None
    written_by = f"llmc {manifest.get('llmc_version', '?')}"
    if version > SCHEMA_VERSION:
        raise BundleError(f"{path}: bundle schema version {version} was written by {written_by}; this llmc "
                          f"({__version__}) reads up to version {SCHEMA_VERSION}. Upgrade llmc on this server or "
                          "rebuild the bundle.")
    if version < MIN_SCHEMA_VERSION:
        raise BundleError(f"{path}: bundle schema version {version} was written by {written_by}; this llmc "
                          f"({__version__}) reads versions {MIN_SCHEMA_VERSION} to {SCHEMA_VERSION}: rebuild it "
                          "with this llmc (`llmc build` of its model.yaml)")
    checksum_path = path / MANIFEST_CHECKSUM
    expected = checksum_path.read_text().strip() if checksum_path.is_file() else None
    if expected != hashlib.sha256(body).hexdigest():
        raise BundleError(f"{manifest_path}: checksum mismatch with {MANIFEST_CHECKSUM} — the manifest was "
                          "modified or damaged; rebuild or re-copy the bundle")
    try:
        return manifest_from_dict(manifest)
    except ValueError as err:
        raise BundleError(f"{manifest_path}: this llmc ({__version__}) cannot read the manifest {written_by} "
                          f"wrote ({err}); rebuild the bundle with this llmc (`llmc build` of its "
                          "model.yaml)") from None


def verify_files(path: Path, manifest: Manifest) -> list[str]:
    """Check every listed file's size and sha256; raise naming the first bad file. Returns the names."""
    for rel, meta in manifest.files.items():
        file = path / rel
        if not file.is_file():
            raise BundleError(f"{path}: file {rel} is missing; re-copy the bundle")
        if file.stat().st_size != meta.size:
            raise BundleError(f"{path}: file {rel} is truncated or altered (size {file.stat().st_size}, "
                              f"manifest says {meta.size}); re-copy the bundle")
        if sha256_file(file) != meta.sha256:
            raise BundleError(f"{path}: file {rel} fails its sha256 check (tampered or corrupt); "
                              "re-copy or rebuild the bundle")
    return list(manifest.files)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load a bundle's manifest and (by default) verify every file against it."""
    path = Path(path).resolve()
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return Bundle(path, manifest)
