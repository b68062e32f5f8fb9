#!/bin/sh
# The polyglot example's job: a plain shell loop calling service B by its mesh name with curl,
# one line per call: "job N: STATUS BODY" (STATUS 000 when curl got no answer; curl's own
# message, e.g. "Could not resolve host: b.service", goes to the log too).
#
# Environment: URL (required), EVERY (seconds between calls, default 2, at least 0.1 so the job
# cannot hammer B), COUNT (calls before the job goes idle; 0 = forever, the default).
set -u
: "${URL:?URL is required}"
EVERY=${EVERY:-2}
COUNT=${COUNT:-0}
case $EVERY in
  '' | *[!0-9.]* | *.*.* | .) echo "job: EVERY must be a number of seconds, got '$EVERY'" >&2; exit 2 ;;
esac
if awk -v e="$EVERY" 'BEGIN { exit !(e < 0.1) }'; then
  echo "job: EVERY=$EVERY is below 0.1 s; using 0.1" >&2
  EVERY=0.1
fi
case $COUNT in
  '' | *[!0-9]*) echo "job: COUNT must be a whole number, got '$COUNT'" >&2; exit 2 ;;
esac

i=0
while [ "$COUNT" -eq 0 ] || [ "$i" -lt "$COUNT" ]; do
  # Wait first: pods start together, and B may not listen yet at the very start (that call would
  # show as 000, "Couldn't connect to server").
  sleep "$EVERY"
  i=$((i + 1))
  # The body, then a space and the status code (curl's --write-out comes after the body).
  resp=$(curl -sS --max-time 5 --write-out ' %{http_code}' "$URL")
  code=${resp##* }
  body=$(printf '%s' "${resp% *}" | tr '\n' ' ')
  body=${body% }
  echo "job $i: $code${body:+ $body}"
done
echo "job: done after $COUNT calls; idle until the mesh stops"
# Idle rather than exit: a pod's service that exits is restarted (restart: always).
exec sleep 2147483647
