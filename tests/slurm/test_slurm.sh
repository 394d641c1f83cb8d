#!/usr/bin/env bash
# `make test-slurm`: run the demo through profiles/slurm on a real one-node
# SLURM cluster on this machine and check that its all.csv equals the local
# run's (`make demo`, which the make target runs first).
#
# 1. installs slurm-wlm and munge from Debian packages when they are missing;
# 2. writes /etc/slurm/slurm.conf (the jobstep executor drops SLURM_CONF
#    inside jobs, so no other path works) with one node that has every core,
#    most of the memory and one fake GPU (Gres=gpu:1 on /dev/null), because
#    with `device: auto` the train/features/model-scorer jobs ask --gpus=1;
# 3. starts munged, slurmctld and slurmd, runs the demo in a copy of the
#    working tree with the squeue status command (no slurmdbd here, so sacct
#    knows no jobs), compares the tables, and stops what it started.
# Every step that waits is bounded with `timeout -s KILL`: a Snakemake that
# waits on a job status that never comes ignores SIGTERM.
#
# Needs root (daemons, /etc/slurm). Environment:
#   SLURM_TEST_DIR      work folder (default: a new /tmp/oodbench-slurm.*)
#   SLURM_TEST_TIMEOUT  seconds for the Snakemake run (default 2400)
#   SLURM_TEST_KEEP=1   keep the work folder after success
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SNAKEMAKE=${SNAKEMAKE:-$ROOT/.venv/bin/snakemake}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
LOCAL_TABLE=$ROOT/results/tables/all.csv
CONF_DIR=/etc/slurm
MARKER="# written by oodbench tests/slurm/test_slurm.sh"
RUN_TIMEOUT=${SLURM_TEST_TIMEOUT:-2400}
WORK=${SLURM_TEST_DIR:-$(mktemp -d /tmp/oodbench-slurm.XXXXXX)}
mkdir -p "$WORK"
STARTED=()

say() { printf '[test-slurm] %s\n' "$*"; }
fail() {
    printf '[test-slurm] FAILED: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || fail "needs root: it installs packages, writes $CONF_DIR and starts daemons"
[[ -x $SNAKEMAKE ]] || fail "$SNAKEMAKE not found: run 'make install' first"
[[ -f $LOCAL_TABLE ]] || fail "$LOCAL_TABLE not found: run 'make demo' first (the local run to compare with)"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    timeout -s KILL 600 apt-get update -qq
    timeout -s KILL 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# Never overwrite a configuration someone else wrote.
for f in slurm.conf gres.conf; do
    if [[ -f $CONF_DIR/$f ]] && ! grep -qF "$MARKER" "$CONF_DIR/$f"; then
        fail "$CONF_DIR/$f exists and was not written by this test; refusing to replace it"
    fi
done
# Daemons left by an earlier run that was killed (our config is in place).
if [[ -f $CONF_DIR/slurm.conf ]]; then
    pkill -KILL -x slurmd || true
    pkill -KILL -x slurmctld || true
fi

stop_all() {
    local rc=$?
    set +e
    if ((${#STARTED[@]})); then
        say "stopping the daemons it started"
        timeout -s KILL 10 scancel --user=root >/dev/null 2>&1
        for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
            kill "${STARTED[i]}" 2>/dev/null
        done
        sleep 1
        for pid in "${STARTED[@]}"; do kill -KILL "$pid" 2>/dev/null; done
        # Job steps of an interrupted run outlive slurmd (Snakemake inside a job
        # ignores SIGTERM); only this test's cluster runs here (see the config check).
        pkill -KILL -x slurmstepd 2>/dev/null
    fi
    rm -f "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"
    if [[ $rc -eq 0 && -z ${SLURM_TEST_KEEP:-} && -z ${SLURM_TEST_DIR:-} ]]; then
        rm -rf "$WORK"
    else
        say "work folder kept: $WORK (daemon logs in $WORK/log)"
    fi
    exit $rc
}
trap stop_all EXIT
trap 'exit 130' INT TERM

CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$WORK/log" "$WORK/state" "$WORK/spool" "$CONF_DIR"
cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER
ClusterName=oodbench-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# Finished jobs stay visible to squeue (the status command) and to the check
# of what each job asked for (check_jobs.py) for an hour.
MinJobAge=3600
GresTypes=gpu
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ReturnToService=2
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$CONF_DIR/gres.conf" <<EOF
$MARKER
Name=gpu File=/dev/null
EOF

if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 755 /run/munge # slurmd's job steps reach the socket as other users
    [[ -f /etc/munge/munge.key ]] || timeout -s KILL 30 mungekey --create
    /usr/sbin/munged --foreground --force >"$WORK/log/munged.out" 2>&1 &
    STARTED+=($!)
    for _ in $(seq 50); do [[ -S /run/munge/munge.socket.2 ]] && break; sleep 0.2; done
    [[ -S /run/munge/munge.socket.2 ]] || fail "munged did not start (see $WORK/log/munged.out)"
fi
/usr/sbin/slurmctld -D >"$WORK/log/slurmctld.out" 2>&1 &
STARTED+=($!)
/usr/sbin/slurmd -D -N localhost >"$WORK/log/slurmd.out" 2>&1 &
STARTED+=($!)
say "waiting for the node (CPUs=$CPUS RealMemory=$MEM_MB gpu:1)"
state=""
for _ in $(seq 60); do
    state=$(timeout -s KILL 5 sinfo -h -n localhost -o %T 2>/dev/null || true)
    [[ $state == idle ]] && break
    sleep 1
done
[[ $state == idle ]] || fail "node state '$state' after 60 s (see $WORK/log)"

# The run happens in a copy of the working tree, so the local results stay.
say "copying the working tree to $WORK/run"
mkdir -p "$WORK/run"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) |
    tar -xf - -C "$WORK/run"

say "running the demo through profiles/slurm (timeout ${RUN_TIMEOUT}s)"
cd "$WORK/run"
# --max-threads: the rules ask up to 4 threads and the node has $CPUS; the
# local run gets the same cap from `cores: all`, so the two compute alike.
# --slurm-no-account: there is no accounting database to guess one from.
export PATH="$ROOT/.venv/bin:$PATH"
if ! timeout -s KILL "$RUN_TIMEOUT" "$SNAKEMAKE" results/tables/all.csv \
    --profile profiles/slurm --slurm-status-command squeue --slurm-no-account \
    --slurm-init-seconds-before-status-checks 1 --max-threads "$CPUS" \
    >"$WORK/log/snakemake.out" 2>&1; then
    tail -n 60 "$WORK/log/snakemake.out" >&2
    fail "the SLURM run failed (full log: $WORK/log/snakemake.out)"
fi
grep -E "^[0-9]+ of [0-9]+ steps \(100%\) done" "$WORK/log/snakemake.out" | tail -n 1 | sed 's/^/[test-slurm] /'
njobs=$(find .snakemake/slurm_logs -name '*.log' | wc -l)
say "$njobs SLURM jobs (logs under $WORK/run/.snakemake/slurm_logs):"
"$PYTHON" "$ROOT/tests/slurm/check_jobs.py" --expect-jobs "$njobs" || fail "jobs asked SLURM for the wrong resources"

"$PYTHON" "$ROOT/tests/slurm/compare_tables.py" "$LOCAL_TABLE" "$WORK/run/results/tables/all.csv"
say "passed"
