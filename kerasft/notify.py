"""Notifications when a long job ends (config `train.notify`): a webhook gets an HTTP POST of the
run's summary as JSON; a `mailto:` address gets an email through SMTP.

The SMTP server and its credentials come from the environment only, so they are never written
into config.yaml, lineage.json or any other file of the run dir:
  KERASFT_SMTP_HOST (required for mailto:), KERASFT_SMTP_PORT (default 587 with STARTTLS, 465
  with SSL, else 25), KERASFT_SMTP_USER / KERASFT_SMTP_PASSWORD (login, when both are set),
  KERASFT_SMTP_FROM (default kerasft@<hostname>), KERASFT_SMTP_SECURITY: starttls | ssl | none
  (default starttls when a user is set, else none).
A notification that fails prints one warning line and never fails the run. Stdlib only; the
network modules load when a notification is sent (kerasft.config imports this module for its check).
"""

from __future__ import annotations

import json
import os
import sys

from kerasft.errors import KerasftError

TIMEOUT_SECONDS = 15


def check_targets(targets, key: str = "train.notify") -> None:
    """Raises a one-line KerasftError naming the entry that is neither an http(s) URL nor
    mailto:ADDRESS."""
    for index, target in enumerate(targets):
        target = str(target)
        if target.startswith(("http://", "https://")) and len(target.split("://", 1)[1]) > 0:
            continue
        if target.startswith("mailto:") and "@" in target[len("mailto:"):]:
            continue
        raise KerasftError(f"{key}[{index}]: {target!r} is neither an http(s):// webhook URL nor mailto:ADDRESS")


def notify(targets, event: str, payload: dict) -> list[str]:
    """Sends `payload` (with "event": finished | failed | interrupted) to every target. Returns
    the targets that failed; each failure is also printed as one warning line on stderr."""
    import smtplib
    import urllib.error

    message = {"event": event, **payload}
    failed = []
    for target in targets:
        try:
            if target.startswith("mailto:"):
                _send_mail(target[len("mailto:"):], event, message)
            else:
                _post(target, message)
        except (OSError, smtplib.SMTPException, urllib.error.URLError, ValueError, KerasftError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"kerasft: warning: notification to {_redacted(target)} failed: {reason}", file=sys.stderr, flush=True)
            failed.append(target)
    return failed


def _post(url: str, message: dict) -> None:
    import urllib.request

    body = json.dumps(message, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "kerasft"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
        if not 200 <= response.status < 300:
            raise ValueError(f"HTTP {response.status}")


def _send_mail(address: str, event: str, message: dict) -> None:
    import smtplib
    import socket
    import ssl
    from email.message import EmailMessage

    host = os.environ.get("KERASFT_SMTP_HOST", "")
    if not host:
        raise KerasftError("KERASFT_SMTP_HOST is not set (mailto: needs an SMTP server)")
    user, password = os.environ.get("KERASFT_SMTP_USER", ""), os.environ.get("KERASFT_SMTP_PASSWORD", "")
    security = os.environ.get("KERASFT_SMTP_SECURITY", "starttls" if user else "none")
    if security not in ("starttls", "ssl", "none"):
        raise KerasftError(f"KERASFT_SMTP_SECURITY: {security!r} is not one of starttls, ssl, none")
    port = int(os.environ.get("KERASFT_SMTP_PORT") or {"starttls": 587, "ssl": 465, "none": 25}[security])
    mail = EmailMessage()
    mail["Subject"] = f"kerasft: run {message.get('run', '')} {event}"
    mail["From"] = os.environ.get("KERASFT_SMTP_FROM") or f"kerasft@{socket.gethostname()}"
    mail["To"] = address
    mail.set_content(_mail_text(event, message))
    mail.add_attachment(json.dumps(message, indent=2, default=str), subtype="json", filename="summary.json")
    smtp_class = smtplib.SMTP_SSL if security == "ssl" else smtplib.SMTP
    with smtp_class(host, port, timeout=TIMEOUT_SECONDS) as smtp:
        if security == "starttls":
            smtp.starttls(context=ssl.create_default_context())
        if user and password:
            smtp.login(user, password)
        smtp.send_message(mail)


def _mail_text(event: str, message: dict) -> str:
    lines = [f"kerasft run {message.get('run', '')} {event}.", f"run dir: {message.get('run_dir', '')}"]
    if message.get("error"):
        lines.append(f"error: {message['error']}")
    summary = message.get("summary") or {}
    for name, metrics in (summary.get("eval") or {}).items():
        lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
    if summary.get("train"):
        lines.append("train: " + ", ".join(f"{k} {v}" for k, v in summary["train"].items()))
    return "\n".join(lines) + "\n"


def _redacted(target: str) -> str:
    """The target without a query string or user info (webhook URLs often carry a secret)."""
    if target.startswith("mailto:"):
        return target
    scheme, rest = target.split("://", 1)
    host_path = rest.split("@", 1)[-1].split("?", 1)[0]
    return f"{scheme}://{host_path}"
