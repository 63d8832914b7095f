#!/bin/sh
# Runs an oracle test script with the system Python 3 (standard library only).
exec /usr/bin/python3 "$@"
