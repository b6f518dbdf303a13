# record-offload %postun: on upgrade ($1 >= 1) restart the service if it is running.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
	if [ "$1" -ge 1 ]; then
		systemctl try-restart record-offload.service >/dev/null 2>&1 || :
	fi
fi
exit 0
