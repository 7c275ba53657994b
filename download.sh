#!/usr/bin/env bash
# Download Code Llama weights with the presigned URL Meta emails after you accept the license.
#
#   bash download.sh                       # asks for the URL and the models
#   PRESIGNED_URL='https://...*...' MODEL_SIZE=7b,13b-Instruct TARGET_FOLDER=weights bash download.sh
#
# MODEL_SIZE is a comma-separated list (empty: every model); TARGET_FOLDER defaults to the current
# folder. Each model goes to TARGET_FOLDER/CodeLlama-<model>/ and is checked with md5sum. Running it
# again resumes interrupted files. Needs wget (or curl) and md5sum.
set -uo pipefail

ALL_MODELS="7b,13b,34b,70b,7b-Python,13b-Python,34b-Python,70b-Python,7b-Instruct,13b-Instruct,34b-Instruct,70b-Instruct"

fail() {
    echo "error: $*" >&2
    exit 1
}

# Number of consolidated.NN.pth shards of a model (its model-parallel size).
shard_count() {
    case "${1%%-*}" in
        7b) echo 1 ;;
        13b) echo 2 ;;
        34b) echo 4 ;;
        70b) echo 8 ;;
    esac
}

# The canonical spelling of a model name (7b, 13b-Python, 34b-Instruct, ...), or nothing if unknown.
canonical_model() {
    local wanted known
    wanted=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')
    for known in ${ALL_MODELS//,/ }; do
        if [[ "$wanted" == "$(printf '%s' "$known" | tr '[:upper:]' '[:lower:]')" ]]; then
            echo "$known"
            return
        fi
    done
}

if command -v wget >/dev/null 2>&1; then
    DOWNLOADER=wget
elif command -v curl >/dev/null 2>&1; then
    DOWNLOADER=curl
else
    fail "download.sh needs wget or curl to download files: install one of them (e.g. apt-get install wget)"
fi
command -v md5sum >/dev/null 2>&1 || fail "download.sh needs md5sum (GNU coreutils) to verify the files: install coreutils"

if [[ -z "${PRESIGNED_URL:-}" ]]; then
    read -r -p "Enter the URL from email: " PRESIGNED_URL || true
fi
[[ -n "${PRESIGNED_URL:-}" ]] || fail "no download URL given: paste the URL from Meta's email (or set PRESIGNED_URL)"
[[ "$PRESIGNED_URL" == *"*"* ]] || fail "the URL has no '*' in it: paste the whole URL from Meta's email, unchanged"

if [[ -z "${MODEL_SIZE+set}" ]]; then
    read -r -p "Enter the list of models to download without spaces ($ALL_MODELS), or press Enter for all: " MODEL_SIZE || true
fi
[[ -n "${MODEL_SIZE// /}" ]] || MODEL_SIZE=$ALL_MODELS

MODELS=()
for name in ${MODEL_SIZE//,/ }; do
    model=$(canonical_model "$name")
    [[ -n "$model" ]] || fail "unknown model '$name': choose from $ALL_MODELS"
    MODELS+=("$model")
done

TARGET_FOLDER=${TARGET_FOLDER:-.}
mkdir -p "$TARGET_FOLDER" || fail "cannot create the target folder $TARGET_FOLDER"

if [[ -t 1 ]]; then QUIET=0; else QUIET=1; fi
LOG=$(mktemp "${TMPDIR:-/tmp}/download-log.XXXXXX")
trap 'rm -f "$LOG"' EXIT

# fetch REMOTE_PATH: download the URL with REMOTE_PATH in place of '*' (the query string stays) to
# TARGET_FOLDER/REMOTE_PATH, continuing a partial file. Exits with a one-line reason on failure.
fetch() {
    local remote=$1 url=${PRESIGNED_URL/'*'/$1} out="$TARGET_FOLDER/$1" status code=""
    echo "Downloading $remote"
    if [[ "$DOWNLOADER" == wget ]]; then
        local progress=(--progress=bar:force:noscroll)
        [[ "$QUIET" == 1 ]] && progress=(--no-verbose)
        wget --continue "${progress[@]}" -O "$out" "$url" 2>&1 | tee "$LOG" >&2
        status=${PIPESTATUS[0]}
        code=$(grep -oE 'ERROR [0-9]{3}' "$LOG" | tail -n 1 | cut -c7-)
    else
        # Messages go to the log when quiet, to the terminal (with the progress bar) otherwise.
        local progress=(--progress-bar) messages=/dev/stderr
        [[ "$QUIET" == 1 ]] && progress=(--silent --show-error) && messages=$LOG
        code=$(curl --fail --location --continue-at - "${progress[@]}" -o "$out" -w '%{http_code}' "$url" 2>"$messages")
        status=$?
        # 416 (range not satisfiable) to a resume request: the file is already complete.
        if [[ "$status" != 0 && "$code" == 416 && -s "$out" ]]; then
            echo "$remote is already complete"
            return
        fi
        [[ "$QUIET" == 1 ]] && cat "$LOG" >&2
    fi
    if [[ "$status" == 0 ]]; then
        return
    fi
    [[ -s "$out" ]] || rm -f "$out"
    case "$code" in
        403 | 404)
            fail "HTTP $code for $remote: the download link may have expired (links last 24 hours): request a new one from Meta" ;;
        "" | 000)
            fail "could not download $remote ($DOWNLOADER exit status $status): check the URL and your connection, then run download.sh again to resume" ;;
        *)
            fail "HTTP $code for $remote ($DOWNLOADER exit status $status): run download.sh again to resume" ;;
    esac
}

echo "Downloading LICENSE and Acceptable Usage Policy"
fetch "LICENSE"
fetch "USE_POLICY.md"

for model in "${MODELS[@]}"; do
    folder="CodeLlama-$model"
    echo "Downloading $folder"
    mkdir -p "$TARGET_FOLDER/$folder" || fail "cannot create $TARGET_FOLDER/$folder"
    shards=$(shard_count "$model")
    for ((shard = 0; shard < shards; shard++)); do
        fetch "$folder/$(printf 'consolidated.%02d.pth' "$shard")"
    done
    fetch "$folder/params.json"
    fetch "$folder/tokenizer.model"
    fetch "$folder/checklist.chk"

    echo "Checking checksums of $folder"
    if ! (cd "$TARGET_FOLDER/$folder" && md5sum -c checklist.chk) >"$LOG" 2>&1; then
        cat "$LOG"
        bad=$(sed -n 's/: FAILED.*$//p' "$LOG" | sed "s|^|$folder/|" | paste -sd, - | sed 's/,/, /g')
        fail "checksum mismatch: ${bad:-see the md5sum output above} (delete it and run download.sh again)"
    fi
    cat "$LOG"
done
echo "Done: ${MODELS[*]} in $TARGET_FOLDER"
