#!/usr/bin/env bash
# System packages the tests use beyond pip: Debian's Chromium and its WebDriver for the demo's
# browser test (tests/test_chat_demo.py), and a Japanese font so its screenshot is legible.
# Without them that one test is skipped, with the reason in pytest's summary.
set -euo pipefail
packages=(chromium chromium-driver fonts-ipafont-gothic)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
