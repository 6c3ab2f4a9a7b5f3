"""A minimal SMTP server that answers every command after a fixed delay and discards the
mail: a stand-in for a remote relay with a round-trip time of DELAY seconds.

    python3 slow_smtp.py PORT DELAY
"""

import asyncio
import sys

PORT, DELAY = int(sys.argv[1]), float(sys.argv[2])
accepted = 0


async def reply(writer, line):
    await asyncio.sleep(DELAY)
    writer.write(line.encode() + b"\r\n")
    await writer.drain()


async def session(reader, writer):
    global accepted
    await reply(writer, "220 slow-smtp ESMTP")
    while line := await reader.readline():
        verb = line.decode(errors="replace").strip().split(" ")[0].upper()
        if verb in ("EHLO", "HELO"):
            await reply(writer, "250 slow-smtp")
        elif verb == "DATA":
            await reply(writer, "354 go ahead")
            while await reader.readline() not in (b".\r\n", b".\n", b""):
                pass
            accepted += 1
            await reply(writer, f"250 queued as {accepted}")
        elif verb == "QUIT":
            await reply(writer, "221 bye")
            break
        else:
            await reply(writer, "250 ok")
    writer.close()


async def main():
    server = await asyncio.start_server(session, "127.0.0.1", PORT, backlog=256)
    async with server:
        await server.serve_forever()


asyncio.run(main())
