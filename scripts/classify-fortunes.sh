#!/usr/bin/env bash
# Trains a fortune-category classifier on MiniLM-L6: the head alone vs the head plus LoRA,
# evaluated on a fixed held-out 20% (see peft/examples/classify_fortunes.rs). Installs the
# Debian `fortunes` package if its files are missing, fetches the model, builds in release.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
fortunes=/usr/share/games/fortunes
if [ ! -f "$fortunes/computers" ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get install -y -q fortunes
fi
"$root/scripts/fetch-minilm.sh"
cd "$root"
cargo run --release -p peft --example classify_fortunes -- models/all-minilm-l6-v2 "$fortunes" out/fortunes-lora
