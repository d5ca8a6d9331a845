"""Downloads: a file from a URL written atomically, with a progress bar, given up after a minute without data (a
network that accepts connections but never answers must not hang a run), and archives extracted."""
import hashlib
import os
from pathlib import Path


DOWNLOAD_TIMEOUT = 60.0   # seconds without any data from the server


class DownloadError(Exception):
    def __init__(self, message, timed_out=False):
        super().__init__(message)
        self.timed_out = timed_out


def fetch(url: str, dest: Path, md5=None, timeout=None):
    """url -> dest, written atomically (a .part file renamed at the end), with a progress bar; gives up after
    `timeout` seconds (DOWNLOAD_TIMEOUT) in which the server sends nothing."""
    import socket
    import urllib.error
    import urllib.request

    from tqdm import tqdm
    timeout = DOWNLOAD_TIMEOUT if timeout is None else timeout
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.part")
    digest = hashlib.md5()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "backdoor-toolkit"})
        with urllib.request.urlopen(request, timeout=timeout) as r, open(part, "wb") as f, \
                tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=dest.name, leave=False, disable=None) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except (socket.timeout, TimeoutError) as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"the download of {url} timed out: no data for {timeout:g} s", timed_out=True) from e
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        timed_out = isinstance(reason, (socket.timeout, TimeoutError))
        what = f"timed out: no data for {timeout:g} s" if timed_out else f"failed ({reason})"
        raise DownloadError(f"the download of {url} {what}", timed_out) from e
    if md5 and digest.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise DownloadError(f"the download of {url} is corrupt (MD5 {digest.hexdigest()}, expected {md5})")
    os.replace(part, dest)


def download_archive(url: str, folder: Path, md5, name: str):
    """Download and extract an archive into folder; returns None, or what went wrong (one phrase)."""
    from torchvision.datasets.utils import extract_archive
    archive = folder / url.rsplit("/", 1)[-1]
    print(f"{name}: not on disk, downloading {url} ...")
    try:
        fetch(url, archive, md5)
        extract_archive(str(archive), str(folder))
    except DownloadError as e:
        print(f"{name}: {e}")
        return str(e)
    except Exception as e:   # a damaged archive
        return f"extracting {archive} failed: {type(e).__name__}: {e}"
    return None
