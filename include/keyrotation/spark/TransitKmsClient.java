/*
 * A parquet-java KmsClient for HashiCorp Vault / OpenBao Transit, as keyrotation wraps keys there.
 *
 * Wire contract (the same as keyrotation's Python backend): the master key id is the Transit key name;
 * wrapKey sends {"plaintext": base64(key)} to <url>/v1/<mount>/encrypt/<key> and returns Transit's
 * ciphertext string ("vault:vN:..."), stored verbatim in the key material; unwrapKey sends that exact
 * string to <url>/v1/<mount>/decrypt/<key>.
 *
 * Hadoop properties:
 *   parquet.encryption.kms.instance.url   required: the Transit server (a URL read from a file's key material is
 *                                         never used, so the token goes nowhere but here)
 *   parquet.encryption.key.access.token   the token, or
 *   keyrotation.transit.token.file        a file holding it (read once per client)
 *   keyrotation.transit.mount             Transit's mount path (default "transit")
 *   keyrotation.transit.namespace         a Vault Enterprise / OpenBao namespace (optional)
 *   keyrotation.transit.timeout.seconds   per request (default 30)
 * The token is never logged nor put in an exception message; neither is any key.
 */
package io.keyrotation.parquet;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.net.ConnectException;
import java.net.URI;
import java.net.URLEncoder;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.HttpTimeoutException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.time.Duration;
import java.util.Base64;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.apache.hadoop.conf.Configuration;
import org.apache.parquet.crypto.KeyAccessDeniedException;
import org.apache.parquet.crypto.ParquetCryptoRuntimeException;
import org.apache.parquet.crypto.keytools.KmsClient;

public class TransitKmsClient implements KmsClient {
  public static final String URL_PROPERTY = "parquet.encryption.kms.instance.url";
  public static final String TOKEN_PROPERTY = "parquet.encryption.key.access.token";
  public static final String TOKEN_FILE_PROPERTY = "keyrotation.transit.token.file";
  public static final String MOUNT_PROPERTY = "keyrotation.transit.mount";
  public static final String NAMESPACE_PROPERTY = "keyrotation.transit.namespace";
  public static final String TIMEOUT_PROPERTY = "keyrotation.transit.timeout.seconds";

  private static final ObjectMapper JSON = new ObjectMapper();
  private static final Pattern VERSION = Pattern.compile("^vault:v(\\d+):");

  private HttpClient http;
  private String baseUrl;
  private String mount;
  private String namespace;
  private String token;
  private Duration timeout;

  @Override
  public void initialize(Configuration conf, String kmsInstanceID, String kmsInstanceURL, String accessToken)
      throws KeyAccessDeniedException {
    String url = conf.getTrimmed(URL_PROPERTY);
    if (url == null || url.isEmpty() || KmsClient.KMS_INSTANCE_URL_DEFAULT.equals(url)) {
      throw new ParquetCryptoRuntimeException("TransitKmsClient: set " + URL_PROPERTY + " to the Transit server's "
          + "URL; without it parquet-java takes the URL written in each file's key material and would send the "
          + "token there");
    }
    this.baseUrl = url.replaceAll("/+$", "");
    this.mount = conf.getTrimmed(MOUNT_PROPERTY, "transit").replaceAll("^/+|/+$", "");
    this.namespace = conf.getTrimmed(NAMESPACE_PROPERTY, "");
    this.timeout = Duration.ofSeconds(conf.getLong(TIMEOUT_PROPERTY, 30));
    this.token = readToken(conf, accessToken);
    this.http = HttpClient.newBuilder().connectTimeout(timeout).build();
  }

  private static String readToken(Configuration conf, String accessToken) {
    if (accessToken != null && !accessToken.isEmpty() && !KmsClient.KEY_ACCESS_TOKEN_DEFAULT.equals(accessToken)) {
      return accessToken;
    }
    String file = conf.getTrimmed(TOKEN_FILE_PROPERTY);
    if (file == null || file.isEmpty()) {
      throw new KeyAccessDeniedException("TransitKmsClient: no token: set " + TOKEN_PROPERTY + " or "
          + TOKEN_FILE_PROPERTY);
    }
    try {
      String read = new String(Files.readAllBytes(Paths.get(file)), StandardCharsets.UTF_8).trim();
      if (read.isEmpty()) {
        throw new KeyAccessDeniedException("TransitKmsClient: the token file " + file + " is empty");
      }
      return read;
    } catch (IOException e) {
      throw new KeyAccessDeniedException("TransitKmsClient: cannot read the token file " + file + " ("
          + e.getClass().getSimpleName() + ")");
    }
  }

  @Override
  public String wrapKey(byte[] keyBytes, String masterKeyIdentifier) throws KeyAccessDeniedException {
    String body = "{\"plaintext\":\"" + Base64.getEncoder().encodeToString(keyBytes) + "\"}";
    JsonNode data = call("encrypt", masterKeyIdentifier, body, null);
    JsonNode ciphertext = data.path("ciphertext");
    if (!ciphertext.isTextual()) {
      throw new ParquetCryptoRuntimeException(describe("encrypt", masterKeyIdentifier, null)
          + ": the answer holds no ciphertext");
    }
    return ciphertext.asText();
  }

  @Override
  public byte[] unwrapKey(String wrappedKey, String masterKeyIdentifier) throws KeyAccessDeniedException {
    Matcher m = VERSION.matcher(wrappedKey == null ? "" : wrappedKey);
    if (!m.find()) {
      throw new ParquetCryptoRuntimeException("TransitKmsClient: a wrapped key of master key '" + masterKeyIdentifier
          + "' is not a Transit ciphertext (no vault:vN: prefix); a key wrapped by another KMS needs that KMS's "
          + "client");
    }
    String version = m.group(1);
    String body;
    try {
      body = JSON.writeValueAsString(JSON.createObjectNode().put("ciphertext", wrappedKey));
    } catch (IOException e) {
      throw new ParquetCryptoRuntimeException("TransitKmsClient: cannot encode the request", e);
    }
    JsonNode plaintext = call("decrypt", masterKeyIdentifier, body, version).path("plaintext");
    if (!plaintext.isTextual()) {
      throw new ParquetCryptoRuntimeException(describe("decrypt", masterKeyIdentifier, version)
          + ": the answer holds no plaintext");
    }
    return Base64.getDecoder().decode(plaintext.asText());
  }

  private String describe(String action, String key, String version) {
    return "Transit " + action + " with key '" + key + "'" + (version == null ? "" : " (ciphertext version v"
        + version + ")") + " at " + baseUrl + "/v1/" + mount;
  }

  private JsonNode call(String action, String key, String body, String version) {
    if (key == null || key.isEmpty() || key.contains("/")) {
      throw new ParquetCryptoRuntimeException("TransitKmsClient: not a Transit key name: '" + key + "'");
    }
    String what = describe(action, key, version);
    HttpRequest.Builder request = HttpRequest.newBuilder(
            URI.create(baseUrl + "/v1/" + mount + "/" + action + "/"
                + URLEncoder.encode(key, StandardCharsets.UTF_8)))
        .timeout(timeout)
        .header("X-Vault-Token", token)
        .header("Content-Type", "application/json")
        .POST(HttpRequest.BodyPublishers.ofString(body));
    if (!namespace.isEmpty()) {
      request.header("X-Vault-Namespace", namespace);
    }
    HttpResponse<String> response;
    try {
      response = http.send(request.build(), HttpResponse.BodyHandlers.ofString());
    } catch (ConnectException e) {
      throw new ParquetCryptoRuntimeException(what + ": the server is unreachable (connection refused)");
    } catch (HttpTimeoutException e) {
      throw new ParquetCryptoRuntimeException(what + ": no answer within " + timeout.getSeconds() + " s");
    } catch (IOException e) {
      throw new ParquetCryptoRuntimeException(what + ": the server is unreachable (" + e.getClass().getSimpleName()
          + ")");
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new ParquetCryptoRuntimeException(what + ": interrupted");
    }
    int status = response.statusCode();
    String errors = errors(response.body());
    if (status == 401 || status == 403) {
      throw new KeyAccessDeniedException(what + ": denied (HTTP " + status + "): the token is not valid or lacks the policy for "
          + mount + "/" + action + "/" + key + errors);
    }
    if (status == 400 && errors.contains("too old")) {
      throw new ParquetCryptoRuntimeException(what + ": refused, version v" + version + " is below the key's "
          + "min_decryption_version (retired); the file's key material must be re-wrapped under a current "
          + "version" + errors);
    }
    if (status != 200) {
      throw new ParquetCryptoRuntimeException(what + ": HTTP " + status + errors);
    }
    try {
      return JSON.readTree(response.body()).path("data");
    } catch (IOException e) {
      throw new ParquetCryptoRuntimeException(what + ": the answer is not JSON");
    }
  }

  /** Transit's own error messages (they name no key material), as ": a; b", or "". */
  private static String errors(String body) {
    try {
      JsonNode list = JSON.readTree(body).path("errors");
      StringBuilder out = new StringBuilder();
      for (JsonNode e : list) {
        out.append(out.length() == 0 ? ": " : "; ").append(e.asText().replaceAll("\\s+", " ").trim());
      }
      return out.toString();
    } catch (IOException | RuntimeException e) {
      return "";
    }
  }
}
