"""A live camera for tests: MJPEG over HTTP (multipart/x-mixed-replace) sent in real time, each
frame stamped in its pixels with the wall-clock time it was sent, so a test can tell from a
retained frame whether it was sent before or after a trigger."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

BITS = 48  # milliseconds since the epoch fit in 48 bits for millennia
BLOCK = 16  # 8 x 6 blocks of 16 px, black = 0 and white = 1, survive JPEG at quality 90


def stamp(ms: int, size: int = 128) -> np.ndarray:
    """A size x size BGR frame: grey, with `ms` written as BITS black/white blocks in its top rows."""
    image = np.full((size, size, 3), 128, np.uint8)
    per_row = size // BLOCK
    for bit in range(BITS):
        r, c = divmod(bit, per_row)
        image[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] = 255 if (ms >> bit) & 1 else 0
    return image


def read_stamp(image: np.ndarray) -> int:
    """The ms stamped by stamp(), read from the centre of each block."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    per_row = gray.shape[1] // BLOCK
    ms = 0
    for bit in range(BITS):
        r, c = divmod(bit, per_row)
        if gray[r * BLOCK + BLOCK // 2, c * BLOCK + BLOCK // 2] > 128:
            ms |= 1 << bit
    return ms


class LiveCamera:
    """http://127.0.0.1:<port>/stream.mjpg at `fps`, each frame stamped with its send time (epoch ms)."""

    def __init__(self, port: int, fps: float = 25.0) -> None:
        self.port = port
        self.fps = fps
        self.sent = 0
        self._stop = threading.Event()
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                due = time.monotonic()
                try:
                    while not camera._stop.is_set():
                        due += 1.0 / camera.fps
                        ok, jpeg = cv2.imencode(".jpg", stamp(int(time.time() * 1000)), [cv2.IMWRITE_JPEG_QUALITY, 90])
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg.tobytes() + b"\r\n")
                        camera.sent += 1
                        camera._stop.wait(max(0.0, due - time.monotonic()))  # real-time pacing, not a test sync
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="live-camera", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> LiveCamera:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
