#!/usr/bin/env python3
"""Packages sluice.wasm as an OCI image that Istio can pull (`oci://...`), without Docker.

    scripts/wasm_oci.py [--wasm target/wasm32-wasip1/release/sluice.wasm] [--tag 0.1.0]
                        [--out target/oci/sluice] [--json]

Writes an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/*`) holding
one image tagged TAG, prints the image's manifest digest, the wasm's sha256, and the commands
that push it to a registry and the values to put in envoy/istio/20-sluice-envoyfilter.yaml.
Only the Python standard library is used; the output is byte-for-byte reproducible for the
same wasm and tag (fixed timestamps, owners and gzip header), so the same build always gives
the same manifest digest.

Which format, and why. The Istio agent's fetcher (istio/istio pkg/wasm/imagefetcher.go,
`PrepareFetch`) accepts three variants of the Wasm image spec
(https://github.com/solo-io/wasm/blob/master/spec/README-compat.md):
  1. Docker image manifest, single layer `application/vnd.docker.image.rootfs.diff.tar.gzip`
     holding `plugin.wasm` (what `docker build` of envoy/istio/Dockerfile.wasm pushes);
  2. "compat" OCI image: OCI manifest whose layer is `application/vnd.oci.image.layer.v1.tar+gzip`
     holding `plugin.wasm` (what buildah produces);
  3. "oci" artifact variant with `application/vnd.module.wasm.content.layer.v1+wasm`, which
     the fetcher (`extractOCIArtifactImage`) only accepts with EXACTLY two layers, the wasm
     layer plus a `application/vnd.module.wasm.config.v1+json` *layer* (the old wasme tool's
     shape) - an artifact pushed today with `oras push` (one layer, the config media type
     in the config descriptor) is rejected with "number of layers must be 2".
This script writes variant 2, the compat OCI image: a plain OCI image, so every registry and
every copy tool (oras, skopeo, crane) handles it, and every Istio version with OCI support
(1.12+) reads it: older fetchers require exactly one layer, newer ones read the last layer.
The manifest carries the `module.wasm.image/variant: compat` annotation the spec asks for.

Which sha256 goes where. For `oci://` URLs the agent compares the EnvoyFilter's `sha256`
with the image MANIFEST digest (imagefetcher.go: `actualDigest = img.Digest()`; cache.go:
"module downloaded from ... has checksum ..., which does not match"). For `https://` URLs it
compares the sha256 of the downloaded .wasm bytes. Both are printed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WASM = ROOT / "target/wasm32-wasip1/release/sluice.wasm"
DEFAULT_OUT = ROOT / "target/oci/sluice"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
WASM_MAGIC = b"\x00asm"
# OCI distribution spec tag grammar.
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def crate_version() -> str:
    """The [package] version in Cargo.toml (tomllib needs Python 3.11, so read it by hand)."""
    in_package = False
    for line in (ROOT / "Cargo.toml").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            in_package = line == "[package]"
        elif in_package:
            m = re.match(r'version\s*=\s*"([^"]+)"', line)
            if m:
                return m.group(1)
    return "0.0.0"


def canonical_json(obj) -> bytes:
    # Stable bytes: the manifest digest must not depend on dict order or whitespace.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def layer_tar(wasm: bytes) -> bytes:
    """An uncompressed tar with one regular file, plugin.wasm, with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("plugin.wasm")
        info.size = len(wasm)
        info.mode = 0o644
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # No file name and mtime 0 in the gzip header, so the bytes are reproducible.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_blob(out: Path, data: bytes) -> dict:
    digest = sha256_hex(data)
    path = out / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build(wasm_path: Path, tag: str, out: Path) -> dict:
    wasm = wasm_path.read_bytes()
    if wasm[:4] != WASM_MAGIC:
        raise SystemExit(f"wasm_oci: {wasm_path} is not a WebAssembly module (no \\0asm header)")
    if not TAG_RE.match(tag):
        raise SystemExit(f"wasm_oci: invalid tag {tag!r} (allowed: [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})")
    if out.exists() and any(out.iterdir()) and not (out / "oci-layout").exists():
        raise SystemExit(f"wasm_oci: {out} exists and is not an OCI image layout; refusing to write into it")

    out.mkdir(parents=True, exist_ok=True)
    (out / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))

    tar = layer_tar(wasm)
    layer = {"mediaType": MT_LAYER, **write_blob(out, gzip_bytes(tar))}
    config_doc = {
        # Not a runnable container: the platform names what the file is, as the
        # wasm32-wasip1 target and OCI tooling spell it. Istio ignores the config.
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha256_hex(tar)}"]},
    }
    config = {"mediaType": MT_CONFIG, **write_blob(out, canonical_json(config_doc))}
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config,
        "layers": [layer],
        "annotations": {
            # Required by the compat spec for the OCI layer media type.
            "module.wasm.image/variant": "compat",
            "org.opencontainers.image.title": "sluice",
            "org.opencontainers.image.version": tag,
            "org.opencontainers.image.description": "Sluice Proxy-Wasm filter (plugin.wasm)",
        },
    }
    manifest = {"mediaType": MT_MANIFEST, **write_blob(out, canonical_json(manifest_doc))}

    # index.json: keep other tags already in this layout, replace this one.
    index_path = out / "index.json"
    entries = []
    if index_path.exists():
        try:
            old = json.loads(index_path.read_text())
            entries = [m for m in old.get("manifests", [])
                       if m.get("annotations", {}).get(REF_NAME) != tag]
        except (ValueError, AttributeError):
            entries = []
    entries.append({**manifest, "annotations": {REF_NAME: tag}})
    index_doc = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}
    tmp = index_path.with_suffix(".tmp")
    tmp.write_bytes(json.dumps(index_doc, indent=2).encode() + b"\n")
    os.replace(tmp, index_path)

    return {
        "layout": str(out),
        "tag": tag,
        "manifest_digest": manifest["digest"],
        "manifest_size": manifest["size"],
        "config_digest": config["digest"],
        "layer_digest": layer["digest"],
        "layer_size": layer["size"],
        "wasm": str(wasm_path),
        "wasm_sha256": sha256_hex(wasm),
        "wasm_size": len(wasm),
    }


def report(r: dict) -> str:
    layout = r["layout"]
    try:
        rel = os.path.relpath(layout)
        if not rel.startswith(".."):
            layout = rel
    except ValueError:
        pass
    tag = r["tag"]
    manifest_hex = r["manifest_digest"].split(":", 1)[1]
    return f"""\
OCI image layout: {layout}  (tag {tag}; compat variant: one tar+gzip layer holding plugin.wasm)
  manifest digest: {r['manifest_digest']}  ({r['manifest_size']} bytes)
  layer digest:    {r['layer_digest']}  ({r['layer_size']} bytes)
  wasm sha256:     {r['wasm_sha256']}  ({r['wasm_size']} bytes, {r['wasm']})

Push it (either tool; both keep the manifest bytes, so the digest above stays valid):
  oras cp --from-oci-layout {layout}:{tag} REGISTRY/sluice:{tag}
  skopeo copy --preserve-digests oci:{layout}:{tag} docker://REGISTRY/sluice:{tag}
Check what the registry serves (must equal the manifest digest above):
  skopeo inspect --format '{{{{.Digest}}}}' docker://REGISTRY/sluice:{tag}

In envoy/istio/20-sluice-envoyfilter.yaml (vm_config.code.remote):
  http_uri.uri: oci://REGISTRY/sluice:{tag}
  sha256:       {manifest_hex}      # oci:// -> the MANIFEST digest, without "sha256:"
or, serving the .wasm file itself over HTTPS instead of a registry:
  http_uri.uri: https://HOST/PATH/sluice.wasm
  sha256:       {r['wasm_sha256']}      # https:// -> sha256 of the .wasm bytes
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wasm", type=Path, default=Path(os.environ.get("SLUICE_WASM", DEFAULT_WASM)),
                    help="the built filter (default: %(default)s)")
    ap.add_argument("--tag", default=None, help="image tag (default: the crate version, %s)" % crate_version())
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="OCI layout directory (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead")
    args = ap.parse_args()
    if not args.wasm.is_file():
        print(f"wasm_oci: {args.wasm} not found; build it with `make wasm`", file=sys.stderr)
        return 1
    r = build(args.wasm, args.tag or crate_version(), args.out)
    print(json.dumps(r, indent=2) if args.json else report(r), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
