"""Signups through the web tier at a fixed rate; prints {email: epoch seconds the request was sent} as JSON.

    python3 signup_load.py URL RUN_ID COUNT RATE

Each signup is a new user bench-RUN_ID-N with address bench-RUN_ID-N@bench.invalid, sent
to the app's JSON endpoint; a signup that does not answer 201 stops the run.
"""

import json
import secrets
import sys
import time
import urllib.request

url, run_id, count, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
sent = {}
start = time.monotonic()
for i in range(count):
    time.sleep(max(0.0, start + i / rate - time.monotonic()))
    username = f"bench-{run_id}-{i}"
    email = f"{username}@bench.invalid"
    body = json.dumps({"username": username, "email": email, "password": secrets.token_urlsafe(16)}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    sent[email] = time.time()
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 201:
            sys.exit(f"signup {i} answered {response.status}")
print(json.dumps(sent))
