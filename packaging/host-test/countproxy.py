#!/usr/bin/env python3
"""A TCP relay on 127.0.0.1 that counts the bytes clients send through it.

packaging/host-test.sh puts it between the daemon (in the container) and the local
S3-compatible server, so "how much was sent again after a restart" is measured outside the
daemon. Every 100 ms it writes the total number of bytes received from clients so far
(requests, headers and bodies) to COUNT_FILE.

    countproxy.py LISTEN_PORT UPSTREAM_PORT COUNT_FILE
"""

import asyncio
import os
import sys

total = 0


async def pipe(reader, writer, count):
    global total
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            if count:
                total += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def handle(client_r, client_w, upstream_port):
    try:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, up_w, True), pipe(up_r, client_w, False))


async def report(path):
    last = None
    while True:
        if total != last:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(f"{total}\n")
            os.replace(tmp, path)
            last = total
        await asyncio.sleep(0.1)


async def main():
    listen_port, upstream_port, count_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, upstream_port), "127.0.0.1", listen_port
    )
    asyncio.create_task(report(count_file))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
