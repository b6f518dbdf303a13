# record-offload %preun: on removal ($1 = 0, not on upgrade) stop and disable the service.
# The journal in /var/lib/record-offload is kept.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
	systemctl --no-reload disable --now record-offload.service >/dev/null 2>&1 || :
fi
exit 0
