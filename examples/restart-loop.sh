#!/bin/sh
# The simplest supervisor: start the service again after every exit. No sleep is
# needed, since memwatch exits only between tasks; a short one keeps a service
# that fails at start from spinning.
while true; do
    python -m classifier
    echo "classifier exited with status $?; starting it again" >&2
    sleep 1
done
