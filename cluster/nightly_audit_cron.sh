#!/usr/bin/env bash
# Submit tonight's audit to a Ray cluster with `ray job submit`, follow its log and exit with
# its exit code: 0 done, 3 done but an anomaly rate above its alert level, 4 done but inputs
# failed for a reason other than a bad file (retried the next night), 1 failed (the next
# night retries it), 2 bad config or model. For cron on a machine that reaches the cluster's dashboard (the head of
# a `ray up ray_cluster.yaml` cluster, or a laptop with `ray dashboard ray_cluster.yaml` open):
#
#   15 2 * * *  cd /opt/stfpm && cluster/nightly_audit_cron.sh cluster/audit.yaml >> /var/log/stfpm-audit.log 2>&1
#
# One submission per night: the submission id is stfpm-audit-<UTC date>, so a second start the
# same night (cron fired twice, someone ran it by hand) does not run a second audit; it waits
# for the night's job and reports its exit code. RETRY=1 submits again under a new id.
#
# Environment:
#   RAY_ADDRESS     the dashboard / job API (default http://127.0.0.1:8265)
#   RAY_AUTH_MODE   token (the default here; Ray 2.60 clusters use token authentication)
#   RAY_AUTH_TOKEN  the token, unless it is in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH)
#   WORKING_DIR     uploaded as the job's working dir (default: this repository)
#   JOB_PYTHON      the python that runs the job on the cluster (default: python, the image's)
#   PYTHON          the python here, with Ray installed (default: python3)
#   NIGHT           the night's id, for a backfill (default: today's UTC date, YYYYMMDD)
set -euo pipefail

CONFIG=${1:?usage: nightly_audit_cron.sh CONFIG.yaml   (a path in WORKING_DIR, an absolute path on the head, or s3://)}
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
WORKING_DIR=${WORKING_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
JOB_PYTHON=${JOB_PYTHON:-python}
PYTHON=${PYTHON:-python3}
NIGHT=${NIGHT:-$(date -u +%Y%m%d)}
ID="stfpm-audit-${NIGHT}"
if [[ "${RETRY:-0}" == 1 ]]; then
    ID="${ID}-retry-$(date -u +%H%M%S)"
fi

# exit code of a submitted job, waiting for it to finish; "absent" if there is no such job
job_exit_code() {
    "$PYTHON" - "$1" "$2" <<'PY'
import os, sys, time
from ray.job_submission import JobSubmissionClient

job_id, wait = sys.argv[1], sys.argv[2] == "wait"
client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
try:
    info = client.get_job_info(job_id)
except RuntimeError as e:                # the job API answers 404 for an unknown id
    if "404" not in str(e):
        raise
    print("absent")
    sys.exit(0)
while wait and str(info.status) not in ("SUCCEEDED", "FAILED", "STOPPED"):
    time.sleep(5)
    info = client.get_job_info(job_id)
code = info.driver_exit_code
print(code if code is not None else (0 if str(info.status) == "SUCCEEDED" else 1))
PY
}

echo "$(date -u +%FT%TZ) nightly audit ${ID} on ${RAY_ADDRESS}, config ${CONFIG}"
if [[ "$(job_exit_code "$ID" nowait)" == absent ]]; then
    ray job submit --address "$RAY_ADDRESS" --submission-id "$ID" --working-dir "$WORKING_DIR" --no-wait \
        -- "$JOB_PYTHON" jobs/nightly_audit.py --config "$CONFIG"
else
    echo "job ${ID} was already submitted tonight: following it instead of submitting again"
fi
ray job logs --address "$RAY_ADDRESS" --follow "$ID" || true
code=$(job_exit_code "$ID" wait)
echo "$(date -u +%FT%TZ) nightly audit ${ID} exit code ${code} (0 done, 3 alert, 4 errors, 1 failed, 2 bad config)"
exit "$code"
