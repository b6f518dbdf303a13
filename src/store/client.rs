//! The aws-sdk-s3 client as OSS needs it (see the module documentation of `crate::store` for
//! each setting and why), and the pieces it is built from.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation,
    ResponseChecksumValidation, RuntimeComponents, StalledStreamProtectionConfig,
};
use aws_sdk_s3::types::{ServerSideEncryption, StorageClass};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;

use super::Store;
use crate::config::Settings;

/// The header in which OSS answers an object's CRC-64/XZ (decimal).
pub const CRC64_HEADER: &str = "x-oss-hash-crc64ecma";

/// Reads [`CRC64_HEADER`] off the raw answer of one request (the SDK's outputs do not keep
/// headers it does not model).
#[derive(Debug, Clone, Default)]
pub(super) struct Crc64Slot(Arc<std::sync::Mutex<Option<u64>>>);

impl Crc64Slot {
    pub(super) fn get(&self) -> Option<u64> {
        self.0.lock().map(|g| *g).unwrap_or(None)
    }
}

impl Intercept for Crc64Slot {
    fn name(&self) -> &'static str {
        "Crc64Slot"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let value = context
            .response()
            .headers()
            .get(CRC64_HEADER)
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Ok(mut slot) = self.0.lock() {
            *slot = value;
        }
        Ok(())
    }
}

/// `storage.bucket_endpoint`: the endpoint is the bucket's own host, so every request goes to
/// it as it is (the operation's path is the key alone), never with the bucket added.
#[derive(Debug)]
struct BucketEndpoint(String);

impl aws_sdk_s3::config::endpoint::ResolveEndpoint for BucketEndpoint {
    fn resolve_endpoint<'a>(
        &'a self,
        _params: &'a aws_sdk_s3::config::endpoint::Params,
    ) -> aws_sdk_s3::config::endpoint::EndpointFuture<'a> {
        aws_sdk_s3::config::endpoint::EndpointFuture::ready(Ok(
            aws_sdk_s3::config::endpoint::Endpoint::builder()
                .url(self.0.clone())
                .build(),
        ))
    }
}

/// What every new object is stored with, besides its bytes (`storage.*` options).
#[derive(Debug, Clone, Default)]
pub(super) struct ObjectOptions {
    pub(super) storage_class: Option<StorageClass>,
    pub(super) sse: Option<ServerSideEncryption>,
    pub(super) sse_kms_key_id: Option<String>,
    pub(super) content_disposition: Option<String>,
    pub(super) cache_control: Option<String>,
    pub(super) metadata: Vec<(String, String)>,
    pub(super) media: crate::util::media::MediaTypes,
}

impl Store {
    pub fn new(settings: &Settings) -> Store {
        let st = &settings.config.storage;
        let up = &settings.config.upload;
        let request_timeout = Duration::from_secs_f64(up.request_timeout_secs);
        // Under a bandwidth limit a body may legitimately move at the limit shared by every
        // request in flight: the deadlines allow for that.
        let mut min_bytes_per_sec = up.min_bytes_per_sec.max(1);
        if up.max_bytes_per_sec > 0 {
            min_bytes_per_sec =
                min_bytes_per_sec.min((up.max_bytes_per_sec / up.concurrency.max(1) as u64).max(1));
        }
        let creds = Credentials::new(
            st.access_key_id.clone(),
            settings.secret.clone(),
            None,
            None,
            "record-offload-config",
        );
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(st.region.clone()));
        let endpoint = st.endpoint.trim_end_matches('/').to_string();
        conf = if st.bucket_endpoint {
            conf.endpoint_resolver(BucketEndpoint(endpoint))
        } else {
            conf.endpoint_url(endpoint)
        };
        if let Some(ctx) = &settings.tls {
            let http = aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .tls_context(ctx.clone())
                .build_https();
            conf = conf.http_client(http);
        }
        let conf = conf
            .credentials_provider(creds)
            .force_path_style(st.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(request_timeout.min(Duration::from_secs(10)))
                    .build(),
            )
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled()
                    .upload_enabled(false)
                    .download_enabled(true)
                    .grace_period(request_timeout)
                    .build(),
            )
            .build();
        let sse = match st.sse.as_deref() {
            Some("AES256") => Some(ServerSideEncryption::Aes256),
            Some("KMS") => Some(ServerSideEncryption::AwsKms),
            _ => None,
        };
        let options = ObjectOptions {
            storage_class: st.storage_class.as_deref().map(StorageClass::from),
            sse: sse.clone(),
            sse_kms_key_id: st.sse_kms_key_id.clone(),
            content_disposition: st.content_disposition.clone(),
            cache_control: st.cache_control.clone(),
            metadata: st
                .metadata
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            media: settings.media.clone(),
        };
        Store {
            client: Client::from_conf(conf),
            bucket: st.bucket.clone(),
            request_timeout,
            min_bytes_per_sec,
            options: Arc::new(options),
            etag_is_md5: sse != Some(ServerSideEncryption::AwsKms),
        }
    }
}
