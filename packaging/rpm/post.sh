# record-offload %post: make systemd see the new unit. The service is neither enabled nor
# started here: the operator does that once the config and the secret are in place.
# The journal's directory: systemd also creates it (StateDirectory=); creating it here lets
# `record-offload check-config` and `status` find it before the first start. (Not a packaged
# %dir: cargo-generate-rpm 0.21 cannot package an empty directory.)
if [ ! -d /var/lib/record-offload ]; then
	install -d -o record-offload -g record-offload -m 0750 /var/lib/record-offload
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
	echo "record-offload is installed but not started. Edit /etc/record-offload/config.toml,"
	echo "put the storage secret in /etc/record-offload/secret (mode 0600), check with"
	echo "'record-offload check-config', then: systemctl enable --now record-offload"
fi
exit 0
