# record-offload %pre: create the service user before the files owned by it are installed.
# The same line as /usr/lib/sysusers.d/record-offload.conf, which is not on disk yet.
if command -v systemd-sysusers >/dev/null 2>&1; then
	systemd-sysusers --replace=/usr/lib/sysusers.d/record-offload.conf - <<'SYSUSERS'
u record-offload - "record-offload daemon" /var/lib/record-offload
SYSUSERS
else
	getent group record-offload >/dev/null || groupadd -r record-offload
	getent passwd record-offload >/dev/null || useradd -r -g record-offload \
		-d /var/lib/record-offload -s /sbin/nologin -c "record-offload daemon" record-offload
fi
exit 0
