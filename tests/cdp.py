"""Drive headless Chromium through the Chrome DevTools Protocol over --remote-debugging-pipe: no pip package, no
port, no chromedriver. Chromium reads commands on its fd 3 and writes replies/events on its fd 4, each a JSON
message terminated by a NUL byte. (Debian: apt-get install chromium-headless-shell; .ci/run installs it.)

    with Browser() as b:
        page = b.new_page("http://127.0.0.1:PORT/")
        page.eval("document.title")
"""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

CANDIDATES = ["chromium-headless-shell", "chromium", "google-chrome", "chrome"]


def find_chromium():
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Child:
    """The little of subprocess.Popen that a posix_spawn'ed process needs here."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.02)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class CDPError(RuntimeError):
    pass


class Browser:
    def __init__(self, binary=None, timeout=30.0):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise FileNotFoundError("no chromium: apt-get install -y chromium-headless-shell (or chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="cdp-profile-")
        # the pipes: we write to w_cmd (its fd 3 reads), we read r_evt (its fd 4 writes); the child's ends are
        # moved above 9, so that putting them on 3 and 4 cannot overwrite one with the other
        r_cmd, self._w_cmd = os.pipe()
        self._r_evt, w_evt = os.pipe()
        r_cmd, w_evt = (_above_9(fd) for fd in (r_cmd, w_evt))
        args = [
            self.binary,
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--no-sandbox",  # as root the sandbox refuses to start; in a container it usually can't anyway
            "about:blank",
        ]
        if not os.path.basename(self.binary).startswith("chromium-headless-shell"):
            args.insert(1, "--headless")  # full chromium needs it; the headless shell is always headless

        # Chromium wants the pipe on its fds 3 and 4. posix_spawn puts them there without running Python in a
        # forked child (JAX warns about forking a multithreaded process; Popen's preexec_fn would).
        devnull = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_WRONLY, 0) for fd in (1, 2)]
        moves = [(os.POSIX_SPAWN_DUP2, r_cmd, 3), (os.POSIX_SPAWN_DUP2, w_evt, 4)]
        self.proc = _Child(os.posix_spawn(self.binary, args, os.environ, file_actions=moves + devnull))
        os.close(r_cmd)
        os.close(w_evt)
        self._next_id = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        buf = b""
        with os.fdopen(self._r_evt, "rb", buffering=0) as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    msg = json.loads(raw)
                    with self._cond:
                        if "id" in msg:
                            self._replies[msg["id"]] = msg
                        else:
                            self.events.append(msg)
                        self._cond.notify_all()

    def send(self, method, params=None, session=None):
        with self._lock:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w_cmd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise CDPError(f"no reply to {method} (chromium exit code {self.proc.poll()})")
                self._cond.wait(left)
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def new_page(self, url):
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.goto(url)
        return page

    def close(self):
        try:
            self.send("Browser.close")
        except CDPError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w_cmd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    def __init__(self, browser, session):
        self.b, self.session = browser, session
        self.send("Runtime.enable")  # console messages / exceptions become events (Runtime.consoleAPICalled, ...)

    def send(self, method, params=None):
        return self.b.send(method, params, self.session)

    def goto(self, url, timeout=15.0):
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", timeout)

    def eval(self, expression, await_promise=False):
        r = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": await_promise}
        )
        if "exceptionDetails" in r:
            raise CDPError(f"JS exception: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression, timeout=15.0, interval=0.05):
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {expression!r}")
            time.sleep(interval)

    def type_into(self, selector, text):
        """Focus the element, select what it holds, and type `text` as the keyboard would (input events fire)."""
        self.eval(f"(e => {{ e.focus(); e.select && e.select(); }})(document.querySelector({json.dumps(selector)}))")
        self.send("Input.insertText", {"text": text})

    def click(self, selector):
        """A real mouse click at the element's centre (not element.click())."""
        box = self.eval(
            f"(r => [r.x + r.width / 2, r.y + r.height / 2])"
            f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())"
        )
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def text(self, selector):
        return self.eval(f"document.querySelector({json.dumps(selector)}).textContent")

    def console_errors(self):
        return [
            e
            for e in self.b.events
            if e.get("method") == "Runtime.exceptionThrown"
            or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")
        ]
