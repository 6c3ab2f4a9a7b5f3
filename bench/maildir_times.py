"""Delivery times of the bench's welcome emails in the sink's Maildir; prints {recipient: mtime} as JSON.

    python3 maildir_times.py MAILDIR RUN_ID COUNT TIMEOUT

Waits until COUNT mails to bench-RUN_ID-*@bench.invalid have arrived, or TIMEOUT seconds.
"""

import email.parser
import json
import os
import sys
import time

maildir, run_id, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
prefix = f"bench-{run_id}-"
parser = email.parser.BytesHeaderParser()
arrived, seen = {}, set()
deadline = time.monotonic() + timeout
while len(arrived) < count and time.monotonic() < deadline:
    for folder in ("new", "cur"):
        for entry in os.scandir(os.path.join(maildir, folder)):
            if entry.name in seen:
                continue
            seen.add(entry.name)
            with open(entry.path, "rb") as message:
                recipient = parser.parse(message).get("To", "")
            if recipient.startswith(prefix):
                arrived[recipient] = entry.stat().st_mtime
    time.sleep(0.5)
print(json.dumps(arrived))
