"""Delivery times of the bench's welcome emails in the sink's Maildir; prints {recipient: [mtime, ...]}
as JSON, one time per mail, so a second mail to the same address shows.

    python3 maildir_times.py MAILDIR RUN_ID COUNT TIMEOUT

Waits until mails to COUNT addresses bench-RUN_ID-*@bench.invalid have arrived, or TIMEOUT seconds,
then 5 s more for any duplicate.
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
settled = None
while time.monotonic() < (settled or deadline):
    for folder in ("new", "cur"):
        for entry in os.scandir(os.path.join(maildir, folder)):
            if entry.name in seen:
                continue
            seen.add(entry.name)
            with open(entry.path, "rb") as message:
                recipient = parser.parse(message).get("To", "")
            if recipient.startswith(prefix):
                arrived.setdefault(recipient, []).append(entry.stat().st_mtime)
    if len(arrived) >= count and settled is None:
        settled = time.monotonic() + 5
    time.sleep(0.5)
print(json.dumps(arrived))
