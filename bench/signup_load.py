"""Signups through the web tier at a fixed rate; prints what was sent and how the web tier answered, as JSON.

    python3 signup_load.py URL RUN_ID COUNT RATE

Each signup is a new user bench-RUN_ID-N with address bench-RUN_ID-N@bench.invalid, sent
to the app's JSON endpoint at its time in the schedule (COUNT at RATE per second), each from
its own thread, so a slow answer does not hold back the next signup, as with many browsers.
Prints {"sent": {email: epoch seconds sent}, "seconds": [request seconds], "failed": {email: why}}:
only answered 201 counts as sent.
"""

import json
import secrets
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

url, run_id, count, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
TIMEOUT = 30  # seconds a signup may take before it counts as failed
results = {"sent": {}, "seconds": [], "failed": {}}
lock = threading.Lock()


def sign_up(i, due):
    time.sleep(max(0.0, due - time.monotonic()))
    username = f"bench-{run_id}-{i}"
    email = f"{username}@bench.invalid"
    body = json.dumps({"username": username, "email": email, "password": secrets.token_urlsafe(16)}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    sent, start = time.time(), time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            outcome = None if response.status == 201 else f"answered {response.status}"
    except Exception as error:  # noqa: BLE001 - any failure is the signup's result, counted, not raised
        outcome = repr(error)
    with lock:
        results["seconds"].append(round(time.monotonic() - start, 4))
        if outcome is None:
            results["sent"][email] = sent
        else:
            results["failed"][email] = outcome


start = time.monotonic()
# Enough threads for every signup in flight over the timeout at this rate.
with ThreadPoolExecutor(max_workers=min(count, int(rate * TIMEOUT) + 1)) as senders:
    for i in range(count):
        senders.submit(sign_up, i, start + i / rate)
print(json.dumps(results))
