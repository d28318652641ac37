#!/usr/bin/env bash
# Set up hpmkd on a fresh Debian-like machine: virtual environment, packages, and the Fashion-MNIST data.
# Idempotent: rerunning only checks what is already there. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import hpmkd, ray, mlflow, torch, torchvision, pytest, skops, lightgbm, xgboost, catboost" 2>/dev/null; then
  echo "[setup] installing packages (torch 2.14.1, torchvision 0.29.1, ray 2.60.0, mlflow 3, skops, boosters): a few minutes"
  "$VENV/bin/pip" install -q --upgrade pip wheel setuptools
  "$VENV/bin/pip" install -q -e ".[test,tune,boosting]"
fi

# Fashion-MNIST: the Debian package where apt exists; otherwise torchvision's download at first run
# (set data.download: true), or point HPMKD_DATA at a folder with the four IDX files.
FMNIST=/usr/share/datasets/fashion-mnist
if [ -n "${HPMKD_DATA:-}" ] && ls "$HPMKD_DATA"/*train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "[setup] Fashion-MNIST found in HPMKD_DATA=$HPMKD_DATA"
elif ls "$FMNIST"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "[setup] Fashion-MNIST found in $FMNIST"
elif command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
else
  echo "[setup] Fashion-MNIST not found and apt-get is not available."
  echo "        Either download the four IDX files into a folder and export HPMKD_DATA=<folder>,"
  echo "        or run with --set data.download=true where the internet is reachable."
fi
echo "[setup] ready: $VENV/bin/hpmkd"
