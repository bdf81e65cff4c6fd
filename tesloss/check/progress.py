"""One progress line on stderr, rewritten in place where stderr is a terminal."""
import sys
import time


class Progress:
    def __init__(self, what, total):
        self.what, self.total, self.done = what, total, 0
        self.start = time.perf_counter()
        self.live = sys.stderr.isatty()

    def step(self, note=""):
        self.done += 1
        if self.live:
            sys.stderr.write(f"\r  {self.what}: {self.done}/{self.total} "
                             f"({time.perf_counter() - self.start:.0f} s) {note[:50]:<50}")
            sys.stderr.flush()

    def close(self):
        if self.live:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
