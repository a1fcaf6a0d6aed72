#!/usr/bin/env bash
# A real aarch64 run of fedge's Raspberry Pi install (issue 28): a Debian 12 (bookworm) arm64 root, the
# userland of Raspberry Pi OS Bookworm (Python 3.11), run under qemu user emulation on an x86-64 host.
#
#   sudo bash benchmarks/platform_aarch64.sh        # writes benchmarks/results/platform_aarch64.json
#
# Inside the root it runs the Pi install line from docs/install.md (a venv, torch, then fedge from this
# checkout's HEAD: fedge is not on PyPI, and installing the copied source stands in for `pip install fedge`),
# then `fedge --version`, `fedge --help` and a few fast unit tests (portable int8/int4 training steps, a reply
# encoded and decoded). It needs root (debootstrap, chroot, mounts), Debian's apt and the network to Debian's
# archive and PyPI. Not part of CI: emulation makes it slow. Measured on a shared 2-core host (2026-12-07): 20 min
# from nothing (debootstrap 10 min, the install line 9 min, fedge --version/--help 2 s each, the tests 1 min).
#
# The root is cached under $CACHE_DIR, so a rerun skips debootstrap (about 11 min); the venv is made afresh every
# run, so the install itself is always tested (pip 23.0 in the root re-downloads its ~300 MB: it kept no HTTP
# cache there). Delete $CACHE_DIR to start from nothing.
set -euo pipefail

# torch for the Pi: a bare `pip install torch` on linux-aarch64 resolves torch 2.11+ to a CUDA-bundled wheel
# (~450 MB plus nvidia-* packages); 2.10 is the newest CPU-only aarch64 wheel on PyPI. Checked below.
TORCH_SPEC="${TORCH_SPEC:-torch==2.10.*}"
CACHE_DIR="${CACHE_DIR:-/var/tmp/fedge-aarch64}"
SUITE=bookworm
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
# A limit per phase, generous: under qemu, importing torch alone takes about a minute on a 2-core host.
PHASE_TIMEOUT="${PHASE_TIMEOUT:-5400}"
# Fast unit tests (seconds natively): the portable int8 and int4 layers' forward/backward and logits, LoRA
# training steps on an int4 base, the int8/int4 backends loading a model, a client's round whose int8-encoded
# reply the server decodes back to the trained adapter, codec round trips, the packed wire record, and the
# server merging two honest replies.
TESTS=(
    "tests/test_portable.py::test_layer_is_a_linear_with_integer_weight_and_matching_forward_backward"
    "tests/test_portable.py::test_quantized_model_logits_close_to_fp32"
    "tests/test_portable.py::test_peft_lora_trains_on_int4_base"
    "tests/test_backends.py::test_load_base_model_portable_int_paths_use_quantized_layers"
    "tests/test_codecs.py::test_round_trip_error"
    "tests/test_wire.py::test_a_packed_record_is_two_arrays_whatever_the_tensor_count_and_reads_back_exactly"
    "tests/test_hostile_replies.py::test_the_honest_pair_alone_merges_the_same"
    "tests/test_local_work.py::test_encoded_change_with_error_feedback_decodes_to_the_trained_adapter"
)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results/platform_aarch64.json}"
ROOT="$CACHE_DIR/rootfs"
LOGS="$CACHE_DIR/logs"                      # every phase's full output, for when something fails
SRC_IN_ROOT=/opt/fedge-src
MODE=""                                      # chroot (binfmt_misc runs aarch64 binaries) or proot (-q qemu)
declare -A SECONDS_OF RC_OF                  # phase name -> wall seconds, exit code

log() { printf '[platform_aarch64 %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# Time one phase: `phase NAME command...`; its output goes to $LOGS/NAME.log, its exit code to RC_OF[NAME].
# Never call it as `phase ... || x`: bash ignores set -e in everything such a call runs, subshells included.
phase() {
    local name=$1 start=$SECONDS rc=0
    shift
    log "$name ..."
    # In a subshell, so that set -e stops the phase at its first failing command and the run goes on to write the
    # record. Phases hand results back through files, not variables.
    set +e
    (set -e; "$@") >"$LOGS/$name.log" 2>&1
    rc=$?
    set -e
    SECONDS_OF[$name]=$((SECONDS - start))
    RC_OF[$name]=$rc
    log "$name: ${SECONDS_OF[$name]} s (exit $rc)"
}

# --- host tools -------------------------------------------------------------------------------------------

# binfmt_misc lets the kernel hand every aarch64 ELF, including each subprocess pip or torch spawns, to qemu.
# Containers often lack it; then proot's -q runs qemu for the root's processes and their children instead.
binfmt_works() {
    local dir=/proc/sys/fs/binfmt_misc
    [ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null || return 1
    [ -e "$dir/register" ]
}

install_host_tools() {
    local need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
    if binfmt_works; then
        command -v update-binfmts >/dev/null || need+=(binfmt-support)
    else
        command -v proot >/dev/null || need+=(proot)
    fi
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
    if binfmt_works; then
        # The F flag (qemu-user-static's default) opens the interpreter now, so it works inside the chroot too.
        [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
        grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 && MODE=chroot
    fi
    if [ -z "$MODE" ]; then
        command -v proot >/dev/null || { apt-get update -qq && apt-get install -y -qq proot; }
        MODE=proot
    fi
    echo "mode: $MODE"
}

# --- running inside the root ------------------------------------------------------------------------------

# Run a bash command line inside the root with a clean environment: none of this host's pip settings (its
# constraints, extra index and wheel folder) leak in, as none exist on a Pi. PIP_CERT is the host's CA bundle,
# copied in, so pip trusts what the host trusts (the same Mozilla list, plus a TLS-inspecting proxy's CA if any).
in_root() {
    local env=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
        TERM=dumb PIP_CERT=/etc/fedge-host-ca.crt PIP_PROGRESS_BAR=off PIP_DISABLE_PIP_VERSION_CHECK=1)
    if [ "$MODE" = chroot ]; then
        timeout "$PHASE_TIMEOUT" chroot "$ROOT" /usr/bin/env -i "${env[@]}" /bin/bash -c "$1"
    else
        timeout "$PHASE_TIMEOUT" proot -0 -q qemu-aarch64-static -r "$ROOT" -b /proc -b /sys -b /dev -w /root \
            /usr/bin/env -i "${env[@]}" /bin/bash -c "$1"
    fi
}

MOUNTED=()
mount_root() {
    [ "$MODE" = chroot ] || return 0
    mount -t proc proc "$ROOT/proc" && MOUNTED+=("$ROOT/proc")
    mount -t sysfs sysfs "$ROOT/sys" && MOUNTED+=("$ROOT/sys")
    # /dev with its submounts (/dev/shm for torch's shared memory), slave so nothing propagates to the host.
    mount --rbind /dev "$ROOT/dev" && mount --make-rslave "$ROOT/dev" && MOUNTED+=("$ROOT/dev")
}
unmount_root() {
    local m
    for m in "${MOUNTED[@]}"; do umount -R "$m" 2>/dev/null || umount -l "$m" || true; done
    MOUNTED=()
}
trap unmount_root EXIT

# --- the root ---------------------------------------------------------------------------------------------

# Two stages, so the same steps work in both modes: stage one (host, native) downloads and unpacks the packages,
# stage two (inside, emulated) configures them. A marker file says a root finished; a partial one is redone.
make_root() {
    if [ -e "$ROOT/.fedge-root-ok" ]; then
        echo "cached root: $ROOT"
        return 0
    fi
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    debootstrap --arch=arm64 --variant=minbase --foreign \
        --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"  # for a binfmt entry without F; harmless with it
    in_root "/debootstrap/debootstrap --second-stage"
    touch "$ROOT/.fedge-root-ok"
}

copy_source() {
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/fedge-host-ca.crt"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    rm -rf "${ROOT:?}$SRC_IN_ROOT"
    mkdir -p "$ROOT$SRC_IN_ROOT"
    # HEAD, not the work tree: the run tests a commit (named in the JSON), not someone's unsaved edits.
    # The commit is resolved once and kept: HEAD may move while the run goes on.
    git -C "$REPO" rev-parse HEAD >"$CACHE_DIR/commit"
    git -C "$REPO" archive "$(cat "$CACHE_DIR/commit")" | tar -x -C "$ROOT$SRC_IN_ROOT"
}

# --- inside: the Pi install line, then the checks ---------------------------------------------------------

# docs/install.md's Raspberry Pi line, with the source directory for `fedge` and a report per pip call (what was
# installed and from which URL: download_mb is summed from it). The venv is new each run.
install_line() {
    in_root "set -e; rm -rf ~/fedge /root/report-*.json
        python3 -m venv ~/fedge && . ~/fedge/bin/activate \
        && pip install --report /root/report-torch.json '$TORCH_SPEC' \
        && pip install --report /root/report-fedge.json $SRC_IN_ROOT
        echo nvidia packages: \$(pip list 2>/dev/null | grep -ci nvidia || true)"
}

fedge_version() { in_root ". ~/fedge/bin/activate && cd /root && fedge --version"; }
fedge_help() { in_root ". ~/fedge/bin/activate && cd /root && fedge --help"; }
test_tools() { in_root ". ~/fedge/bin/activate && pip install pytest hypothesis"; }

run_tests() {
    in_root ". ~/fedge/bin/activate && cd $SRC_IN_ROOT && rm -f /root/junit.xml \
        && python -m pytest -x -q -p no:cacheprovider --junitxml=/root/junit.xml ${TESTS[*]}"
}

# --- the record -------------------------------------------------------------------------------------------

# Written by the host's python from the phase logs and the files the run left in the root (pip's install reports,
# pytest's junit XML).
write_json() {
    local phases="" k
    for k in "${!SECONDS_OF[@]}"; do phases+="$k=${SECONDS_OF[$k]} "; done
    PHASES="$phases" ROOT="$ROOT" OUT="$OUT" LOGS="$LOGS" MODE="$MODE" TORCH_SPEC="$TORCH_SPEC" \
        INSTALL_RC="$1" TESTS_RC="$2" TOTAL="$3" COMMIT="$(cat "$CACHE_DIR/commit")" \
        TESTS="${TESTS[*]}" CACHED="$4" QEMU="$(qemu-aarch64-static --version | head -1)" \
        PIP_CONFIG_FILE=/dev/null python3 - <<'EOF'
import datetime, json, os, re
from pathlib import Path
from xml.etree import ElementTree

env, root, logs = os.environ, Path(os.environ["ROOT"]), Path(os.environ["LOGS"])
notes = []

def text(name: str) -> str:
    path = logs / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""

installed = {}
for report in ("report-torch.json", "report-fedge.json"):
    path = root / "root" / report
    if path.exists():
        for item in json.loads(path.read_text())["install"]:
            installed[item["metadata"]["name"].lower()] = item["metadata"]["version"]

# pip prints each file it fetches with its size, "Downloading x.whl (146.0 MB)" (or "Using cached x.whl (...)" when
# a rerun finds it cached): their sum is what a Pi downloads for the install line, build dependencies included.
UNITS = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}
fetched = re.findall(r"^\s*(?:Downloading|Using cached) (\S+) \(([\d.]+) (bytes|kB|MB|GB)\)", text("install"), re.M)
download = sum(float(size) * UNITS[unit] for _, size, unit in fetched)

passed = failed = skipped = 0
junit = root / "root/junit.xml"
if junit.exists():
    for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
        passed += int(suite.get("tests", 0)) - int(suite.get("failures", 0)) - int(suite.get("errors", 0)) \
            - int(suite.get("skipped", 0))
if env["TESTS_RC"] != "0":
    tail = [line for line in text("tests").splitlines() if line.strip()][-15:]
    notes.append("tests exited " + env["TESTS_RC"] + "; last lines: " + " | ".join(tail))
if env["INSTALL_RC"] != "0":
    tail = [line for line in text("install").splitlines() if line.strip()][-15:]
    notes.append("install exited " + env["INSTALL_RC"] + "; last lines: " + " | ".join(tail))
nvidia = sorted(name for name in installed if "nvidia" in name)
if nvidia:
    notes.append(f"the install pulled CUDA packages: {nvidia}")
python = next((p.name for p in (root / "root/fedge/bin").glob("python3.*")), "") if (root / "root/fedge/bin").exists() else ""
version = re.search(r"\d+\.\d+\.\d+\S*", text("fedge_version"))
phases = dict(p.split("=") for p in env["PHASES"].split())
record = {
    "install_ok": env["INSTALL_RC"] == "0" and not nvidia,
    "download_mb": round(download / 1e6, 1),
    "tests_passed": passed,
    "tests_failed": failed,
    "python": python.removeprefix("python"),
    "seconds": int(env["TOTAL"]),
    "torch": installed.get("torch"),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "tests_skipped": skipped,
    "phase_seconds": {k: int(v) for k, v in sorted(phases.items())},
    "root_was_cached": env["CACHED"] == "1",
    "fedge_version": version.group(0) if version else None,
    "fedge_help_ok": phases.get("fedge_help") is not None and "usage: fedge" in text("fedge_help"),
    "nvidia_packages": nvidia,
    "torch_spec": env["TORCH_SPEC"],
    "install_line": f"python3 -m venv ~/fedge && . ~/fedge/bin/activate && pip install '{env['TORCH_SPEC']}'"
    " && pip install <fedge source>",
    "packages_installed": len(installed),
    "files_downloaded": len(fetched),
    "platform": "Debian 12 bookworm arm64 (debootstrap minbase), qemu user emulation on x86-64",
    "emulation": f"{env['MODE']}: {env['QEMU']}",
    "fedge_commit": env["COMMIT"],
    "tests": env["TESTS"].split(),
    "notes": notes,
}
Path(env["OUT"]).write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps({k: record[k] for k in list(record)[:14]}, indent=2))
EOF
}

# --- run --------------------------------------------------------------------------------------------------

main() {
    [ "$(id -u)" = 0 ] || { echo "platform_aarch64.sh needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
    mkdir -p "$LOGS"
    local start=$SECONDS cached=0 install_rc=0 tests_rc=0
    [ -e "$ROOT/.fedge-root-ok" ] && cached=1
    # The root: any failure here ends the run (there is nothing to record yet).
    phase host_tools install_host_tools
    MODE="$(sed -n 's/^mode: //p' "$LOGS/host_tools.log")"
    phase debootstrap make_root
    phase copy_source copy_source
    local p
    for p in host_tools debootstrap copy_source; do
        if [ "${RC_OF[$p]}" != 0 ]; then
            tail -20 "$LOGS/$p.log" >&2
            exit 1
        fi
    done
    mount_root
    phase arch_check in_root "uname -m; python3 --version"
    grep -qx aarch64 "$LOGS/arch_check.log" || { echo "the root does not run as aarch64" >&2; exit 1; }
    # fedge inside it: failures from here on are recorded in the JSON.
    phase install install_line
    install_rc=${RC_OF[install]}
    if [ "$install_rc" = 0 ]; then
        phase fedge_version fedge_version
        phase fedge_help fedge_help
        install_rc=$((RC_OF[fedge_version] | RC_OF[fedge_help]))
        phase test_tools test_tools
        tests_rc=${RC_OF[test_tools]}
        if [ "$tests_rc" = 0 ]; then
            phase tests run_tests
            tests_rc=${RC_OF[tests]}
        fi
    else
        tests_rc=$install_rc
    fi
    unmount_root
    write_json "$install_rc" "$tests_rc" "$((SECONDS - start))" "$cached"
    log "wrote $OUT (logs in $LOGS)"
    [ "$install_rc" = 0 ] && [ "$tests_rc" = 0 ]
}

main "$@"
