// A gRPC client in another language, built from nothing but the repository's proto/ folder:
// follow/v1/follow.proto for the calls, google/rpc/status.proto and
// google/rpc/error_details.proto (shipped beside it) to decode the error details.
//
//   node decode_errors.js 127.0.0.1:PORT
//
// Prints one JSON object per call on stdout; tests/test_node_client.py runs it against a
// server on 127.0.0.1 and checks what it decoded.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO = path.resolve(__dirname, '..', '..', 'proto');
const target = process.argv[2];
if (!/^127\.0\.0\.1:\d+$/.test(target || '')) {
  console.error('usage: node decode_errors.js 127.0.0.1:PORT');
  process.exit(2);
}

const definition = protoLoader.loadSync('follow/v1/follow.proto', {
  includeDirs: [PROTO],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
});
const follow = grpc.loadPackageDefinition(definition).follow.v1;

// google.rpc.Status and ErrorInfo from the shipped files; the well-known types they import
// (any.proto, duration.proto) are part of every protobuf runtime, protobufjs's included.
const rpc = new protobuf.Root();
rpc.resolvePath = (origin, file) => path.join(PROTO, file);
rpc.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const Status = rpc.lookupType('google.rpc.Status');
const ErrorInfo = rpc.lookupType('google.rpc.ErrorInfo');

function details(error) {
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return null;
  const status = Status.decode(raw);
  return {
    code: status.code,
    message: status.message,
    infos: status.details
      .filter((any) => any.type_url === 'type.googleapis.com/google.rpc.ErrorInfo')
      .map((any) => {
        const info = ErrorInfo.toObject(ErrorInfo.decode(any.value));
        return { reason: info.reason, domain: info.domain, metadata: info.metadata || {} };
      }),
  };
}

function call(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: Date.now() + 10000 }, (error, response) => {
      if (error) {
        resolve({ method, code: grpc.status[error.code], details: details(error) });
      } else {
        resolve({ method, code: 'OK', response });
      }
    });
  });
}

async function main() {
  const credentials = grpc.credentials.createInsecure();
  const follows = new follow.FollowService(target, credentials);
  const accounts = new follow.AccountService(target, credentials);
  const results = [
    await call(accounts, 'ImportAccounts', { accounts: [{ user_id: 'node-a' }] }),
    await call(follows, 'Follow', { user_id: '', target_ids: ['node-a'] }),
    await call(follows, 'Follow', { user_id: 'node-a', target_ids: [] }),
    await call(follows, 'List', {
      user_id: 'node-a',
      follow_type: 'FOLLOW_TYPE_FAN',
      page_token: 'not-a-token',
    }),
    await call(follows, 'Check', { user_id: 'node-nobody', target_ids: ['node-a'] }),
  ];
  for (const result of results) console.log(JSON.stringify(result));
  follows.close();
  accounts.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
